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
from mote_ray.errors import MoteError
from mote_ray.generation import GenerateConfig, run_generate
from mote_ray.training.run import TrainConfig, run_train

from .fakes import write_format_chains

pytestmark = pytest.mark.ray


# The tiny model cannot self-check: its verdicts are unparseable, so every chain is flagged. The first
# test trains on the default policy (no verdict parses -> unparseable chains train, recorded); the
# others check mechanics and opt in to training on flagged chains.


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


def _chain_lengths(chains, model) -> tuple[list[int], int]:
    """Token length of every chain the default policy trains on, as training encodes it, and a max_len
    that about three quarters of them fit."""
    from mote_ray.generation import read_chains
    from mote_ray.mote.model import MoTEConfig, build_mote_model
    from mote_ray.mote.routing import stage_token_ids
    from mote_ray.training.data import drop_reason, example, flag_policy

    _, tok = build_mote_model(model, MoTEConfig(r=8))
    rows = read_chains(chains).to_pylist()
    policy = flag_policy(rows, False)
    usable = [r for r in rows if drop_reason(r, False, policy["train_unparseable"]) is None]
    lengths = sorted(len(example(r, tok, stage_token_ids(tok), "mote", 10**9)["input_ids"]) for r in usable)
    return lengths, lengths[3 * len(lengths) // 4]


def _mean(xs):
    return sum(xs) / len(xs)


def test_two_fsdp_workers_lower_the_loss_per_stage_and_export(chains, tiny_model_hd32, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # max_len set so about a quarter of the chains do not fit: they must be counted, not silently lost.
    lengths, max_len = _chain_lengths(chains, tiny_model_hd32)
    over = sum(n > max_len for n in lengths)
    assert 1 <= over < len(lengths) // 2
    cfg = TrainConfig(model=tiny_model_hd32, workers=2, max_steps=24, batch_size=4, lr=3e-3, checkpoint_every=8,
                      warmup_ratio=0.1, val_share=0.2, mote={"r": 8, "p_skip": 0.2}, max_len=max_len)
    metrics = run_train(cfg, chains, tmp_path)
    hist = metrics["history"]
    assert [h["step"] for h in hist] == list(range(1, 25))
    for stage in ("analysis", "guidance", "answer"):
        curve = [h[f"loss_{stage}"] for h in hist if f"loss_{stage}" in h]
        assert _mean(curve[-4:]) < _mean(curve[:4]), stage
    saved = json.loads((tmp_path / "train_metrics.json").read_text())
    assert saved["last"] == hist[-1] and saved["workers"] == 2 and "FSDP2" in saved["sharding"]
    # The recipe's numbers: lr schedule, clipped grad norm, per-stage validation loss on held-out prompts.
    assert hist[0]["lr"] < hist[2]["lr"] and hist[-1]["lr"] < hist[2]["lr"]  # warm-up, then cosine decay
    assert all(h["grad_norm"] > 0 for h in hist)
    assert saved["split"]["val"] >= 1 and {f"val_loss_{s}" for s in ("analysis", "guidance", "answer")} <= set(saved)
    assert [v["step"] for v in saved["val_history"]] == [20, 24]  # eval_every=20 and at the end
    assert saved["not_trained_on"][f"over_max_len_{max_len}"] == over  # every long chain counted, once
    # Not one verdict parses, so the default policy trains on the unparseable chains and says so.
    assert saved["flagged"]["unparseable"] >= 8 and saved["flagged"]["unsafe"] == 0
    assert saved["not_trained_on"]["flagged"] == 0 and "no verdict" in saved["flagged"]["policy"]
    # Sharded checkpoints: one DCP shard per rank, no pickled model file.
    ckpt = sorted(p for p in (tmp_path / "checkpoint").glob("checkpoint_*") if p.is_dir())[-1]
    assert {f.name for f in ckpt.glob("__*_0.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
    # MLflow (default: a file store in OUT/mlruns) holds the run, read back with MLflow's own client.
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when allowed
    client = MlflowClient(saved["mlflow"]["tracking_uri"])
    logged = client.get_metric_history(saved["mlflow"]["run_id"], "loss")
    assert [(m.step, round(m.value, 5)) for m in logged] == [(h["step"], round(h["loss"], 5)) for h in hist]
    assert [m.step for m in client.get_metric_history(saved["mlflow"]["run_id"], "val_loss_answer")] == [20, 24]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert base.get_input_embeddings().num_embeddings == 518
    for stage in ("analysis", "guidance", "answer"):
        PeftModel.from_pretrained(base, tmp_path / "adapters" / stage)
    assert (tmp_path / "checkpoint").is_dir() and (tmp_path / "tokenizer" / "tokenizer.json").is_file()


def test_baselines_train_in_the_same_trainer(chains, tiny_model, tmp_path):
    for method in ("sft", "lora-chain"):
        m = run_train(TrainConfig(model=tiny_model, method=method, max_steps=3, batch_size=4, include_flagged=True),
                      chains, tmp_path / method)
        assert m["method"] == method and list(m["adapters"]) == ["default"]


def test_killed_worker_resumes_from_checkpoint(chains, tiny_model, tmp_path):
    import psutil

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mote_ray.cli", "train", "--model", tiny_model, "--chains", str(chains), "--out",
           str(out), "--workers", "2", "--max-steps", "16", "--set", "checkpoint_every=4", "--set", "batch_size=4", "--set", "include_flagged=true"]
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


def test_whole_run_stop_resumes_and_seeded_runs_are_identical(ray_local, tiny_model, tmp_path):
    """Two runs with one seed give identical losses; a run stopped after 3 steps and started again
    with the same output continues the same loss history (model, optimizer, scheduler, data position);
    a rerun with a changed recipe is refused, and --restart starts it over."""
    write_format_chains(tmp_path / "chains", 24, question="Question number {i}?")
    base = dict(model=tiny_model, workers=2, batch_size=4, lr=5e-3, checkpoint_every=3, val_share=0.0,
                schedule="constant", warmup_ratio=0.0, tracking={"mlflow": None}, mote={"r": 4, "p_skip": 0.3})
    straight = run_train(TrainConfig(**base, max_steps=6), tmp_path / "chains", tmp_path / "a")["history"]
    first = run_train(TrainConfig(**base, max_steps=3), tmp_path / "chains", tmp_path / "b")["history"]
    assert [h["loss"] for h in first] == [h["loss"] for h in straight[:3]]  # same seed, same losses, exactly
    resumed = run_train(TrainConfig(**base, max_steps=6), tmp_path / "chains", tmp_path / "b")["history"]
    assert [h["step"] for h in resumed] == list(range(1, 7)) and resumed[:3] == first
    assert [h["loss"] for h in resumed[3:]] == pytest.approx([h["loss"] for h in straight[3:]], rel=1e-6)
    # A changed recipe is refused, naming the field; --restart discards the checkpoint and starts over.
    hotter = TrainConfig(**{**base, "lr": 6e-3}, max_steps=3)
    with pytest.raises(MoteError, match=r"config\.lr: 0\.005 -> 0\.006.*--restart"):
        run_train(hotter, tmp_path / "chains", tmp_path / "b")
    fresh = run_train(hotter, tmp_path / "chains", tmp_path / "b", restart=True)["history"]
    assert [h["step"] for h in fresh] == [1, 2, 3] and fresh[0]["loss"] == first[0]["loss"]  # same start...
    assert fresh[1]["loss"] != first[1]["loss"]  # ...then the new lr


def test_generator_emits_well_formed_stages_after_format_training(format_mote_dir):
    """The session's format-trained model (conftest.format_mote_dir: 60 steps on 32 format chains)."""
    from mote_ray.chat import encode
    from mote_ray.mote.export import load_mote
    from mote_ray.mote.generate import MoTEGenerator
    from mote_ray.records import GenerationRequest

    model, tok = load_mote(format_mote_dir)
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
