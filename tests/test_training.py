"""Ray Train integration: 2 FSDP2 workers on CPU, loss per stage, worker kill + resume, generator format."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mote_ray.config import EngineConfig, PoolConfig
from mote_ray.generation import GenerateConfig, run_generate
from mote_ray.training.run import TrainConfig, run_train

from .fakes import write_format_chains

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def chains(ray_local, datasets_dir, tiny_model, tmp_path_factory):
    """Chains from the real generation job (transformers, tiny model)."""
    d = tmp_path_factory.mktemp("gen")
    lines = (datasets_dir / "advbench/harmful_behaviors.csv").read_text().splitlines(keepends=True)
    (d / "adv.csv").write_text("".join(lines[:25]))
    cfg = GenerateConfig(engine=EngineConfig(model=tiny_model, engine="transformers"), pool=PoolConfig(batch_size=24),
                         max_tokens={"analysis": 24, "guidance": 24, "answer": 32, "check": 4})
    run_generate(cfg, [str(d / "adv.csv")], d / "out", progress=False)
    return d / "out"


def _mean(xs):
    return sum(xs) / len(xs)


def test_two_fsdp_workers_lower_the_loss_per_stage_and_export(chains, tiny_model_hd32, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(model=tiny_model_hd32, workers=2, max_steps=24, batch_size=4, lr=3e-3, checkpoint_every=8,
                      mote={"r": 8, "p_skip": 0.2})
    metrics = run_train(cfg, chains, tmp_path)
    hist = metrics["history"]
    assert [h["step"] for h in hist] == list(range(1, 25))
    for stage in ("analysis", "guidance", "answer"):
        curve = [h[f"loss_{stage}"] for h in hist if f"loss_{stage}" in h]
        assert _mean(curve[-4:]) < _mean(curve[:4]), stage
    saved = json.loads((tmp_path / "train_metrics.json").read_text())
    assert saved["last"] == hist[-1] and saved["workers"] == 2
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert base.get_input_embeddings().num_embeddings == 518
    for stage in ("analysis", "guidance", "answer"):
        PeftModel.from_pretrained(base, tmp_path / "adapters" / stage)
    assert (tmp_path / "checkpoint").is_dir() and (tmp_path / "tokenizer" / "tokenizer.json").is_file()


def test_baselines_train_in_the_same_trainer(chains, tiny_model, tmp_path):
    for method in ("sft", "lora-chain"):
        m = run_train(TrainConfig(model=tiny_model, method=method, max_steps=3, batch_size=4), chains, tmp_path / method)
        assert m["method"] == method and list(m["adapters"]) == ["default"]


def test_killed_worker_resumes_from_checkpoint(chains, tiny_model, tmp_path):
    import psutil

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mote_ray.cli", "train", "--model", tiny_model, "--chains", str(chains), "--out",
           str(out), "--workers", "2", "--max-steps", "16", "--set", "checkpoint_every=4", "--set", "batch_size=4"]
    env = {**os.environ, "RAY_ADDRESS": "", "MOTE_TRAIN_STEP_SLEEP": "0.7"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and killed is None and p.poll() is None:
        time.sleep(1)
        if not list((out / "checkpoint").glob("checkpoint_*")):
            continue
        for child in psutil.Process(p.pid).children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(child.cmdline()):
                    child.send_signal(signal.SIGKILL)
                    killed = child.pid
                    break
            except psutil.NoSuchProcess:
                continue
    log, _ = p.communicate(timeout=600)
    assert killed, "no train worker was found to kill"
    assert p.returncode == 0, log[-3000:]
    hist = json.loads((out / "train_metrics.json").read_text())["history"]
    assert [h["step"] for h in hist] == list(range(1, 17))  # resumed where the checkpoint left off


def test_generator_emits_well_formed_stages_after_format_training(ray_local, tiny_model, tmp_path):
    from mote_ray.chat import encode
    from mote_ray.mote.export import load_mote
    from mote_ray.mote.generate import MoTEGenerator
    from mote_ray.records import GenerationRequest

    write_format_chains(tmp_path / "chains", 32, question="Question number {i}?")
    cfg = TrainConfig(model=tiny_model, max_steps=60, batch_size=8, lr=1e-2, checkpoint_every=60,
                      mote={"r": 8, "p_skip": 0.0})
    run_train(cfg, tmp_path / "chains", tmp_path / "run")
    model, tok = load_mote(tmp_path / "run")
    gen = MoTEGenerator(model, tok)
    ids = encode(tok, GenerationRequest(messages=[{"role": "user", "content": "Question number 99?"}]))
    full = gen.generate(ids, mode="full", limits={"analysis": 12, "guidance": 12, "answer": 12})
    # Well-formed: stages in order, each closed by the model's own end token before its limit.
    assert list(full.stages) == ["analysis", "guidance", "answer"] and full.finish_reason == "stop"
    assert all(full.stage_tokens.get(s, 0) < 12 for s in full.stages)
    assert full.stages["analysis"].startswith("Low")
    ends = [tok.convert_tokens_to_ids(t) for t in ("<|end_analysis|>", "<|end_guidance|>", "<|end_response|>")]
    assert [t for t in full.token_ids if t in ends] == ends and full.token_ids[-1] == ends[-1]
    direct = gen.generate(ids, mode="direct", limits={"answer": 12})
    assert list(direct.stages) == ["answer"] and direct.finish_reason == "stop"
    adaptive = gen.generate(ids, mode="adaptive", limits={"analysis": 12, "guidance": 12, "answer": 12})
    assert list(adaptive.stages)[-1] == "answer" and adaptive.finish_reason == "stop"
