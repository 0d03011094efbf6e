"""The training recipe without Ray: accumulation, schedule, clipping, prompt split, data rules, strict state."""

import math
import subprocess
import sys

import pytest
import torch

from mote_ray.mote.model import MoTEConfig, build_mote_model
from mote_ray.mote.routing import stage_token_ids
from mote_ray.training.data import drop_reason, example, split_by_prompt
from mote_ray.training.recipe import accumulate, clip, make_scheduler, val_metrics, validate


@pytest.fixture(scope="module")
def tiny_mote(tiny_model):
    model, tok = build_mote_model(tiny_model, MoTEConfig(r=4, prompt_expert="answer"), seed=0)
    with torch.no_grad():  # B starts at 0: give every expert a gradient path of its own
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    ids = stage_token_ids(tok)
    rows = [{"question": f"Question {i} about topic {'x' * i}?", "analysis": "Low risk." * (1 + i % 3),
             "guidance": "Be brief.", "answer": "Here you go, friend." * (1 + i % 2)} for i in range(6)]
    return model, tok, [example(r, tok, ids, "mote", 512) for r in rows]


def _grads(model, micro, tok):
    model.zero_grad(set_to_none=True)
    out = accumulate(model, micro, tok.pad_token_id, model.config, 0.0, torch.Generator().manual_seed(0), "cpu")
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, out


def test_n_micro_batches_give_the_update_of_one_big_batch(tiny_mote):
    model, tok, ex = tiny_mote
    big, big_out = _grads(model, [ex[:6]], tok)
    acc, acc_out = _grads(model, [ex[0:2], ex[2:4], ex[4:6]], tok)
    for n in big:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-4, atol=1e-6)
    assert math.isclose(acc_out["loss_sum"] / acc_out["count"], big_out["loss_sum"] / big_out["count"], rel_tol=1e-5)
    # Averaging per-micro-batch means instead (the common bug) differs on uneven batches: the test can fail.
    model.zero_grad(set_to_none=True)
    from mote_ray.training.data import collate
    from mote_ray.training.losses import stage_nll
    from mote_ray.mote.routing import expert_index

    for mb in (ex[0:2], ex[2:4], ex[4:6]):
        b = collate(mb, tok.pad_token_id)
        stage_nll(model(b["input_ids"], expert_index(b["stages"], "answer"), attention_mask=b["attention_mask"]).logits,
                  b["input_ids"], b["stages"])[0].div(3).backward()
    naive = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.allclose(naive[n], big[n], rtol=1e-4, atol=1e-6) for n in big)


def test_clipping_reports_the_total_norm_and_clips_to_the_limit(tiny_mote):
    model, tok, ex = tiny_mote
    _grads(model, [ex[:4]], tok)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = clip(params, 1e-3)
    assert norm > 1e-3
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert float(after) == pytest.approx(1e-3, rel=1e-3)


def test_schedule_values_warmup_then_cosine_or_linear():
    p = torch.nn.Parameter(torch.zeros(1))

    def lrs(schedule):
        opt = torch.optim.SGD([p], lr=1.0)
        s = make_scheduler(opt, schedule, total_steps=10, warmup_ratio=0.2)
        out = []
        for _ in range(10):
            out.append(s.get_last_lr()[0])
            opt.step()
            s.step()
        return out

    cos = lrs("cosine")
    assert cos[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert cos[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))  # halfway through the decay
    assert all(a >= b for a, b in zip(cos[2:], cos[3:]))
    lin = lrs("linear")
    assert lin[2:] == pytest.approx([1.0 - k / 8 for k in range(8)])
    assert lrs("constant")[2:] == pytest.approx([1.0] * 8)


def test_validation_split_keeps_every_chain_of_a_prompt_on_one_side():
    rows = [{"id": f"{q}-{k}", "question": f"prompt {q}", "history": []} for q in range(40) for k in range(3)]
    train, val = split_by_prompt(rows, 0.2, seed=0)
    tq, vq = {r["question"] for r in train}, {r["question"] for r in val}
    assert not tq & vq and len(train) + len(val) == len(rows)
    assert 2 <= len(vq) <= 16 and all(sum(r["question"] == q for r in val) == 3 for q in vq)
    assert split_by_prompt(rows, 0.2, seed=0) == (train, val)  # deterministic
    few = rows[:6]  # two prompts, a tiny share: one prompt is still held out
    assert len({r["question"] for r in split_by_prompt(few, 0.01, seed=0)[1]}) == 1


def test_validation_loss_per_stage_counts_only_real_batches(tiny_mote):
    model, tok, ex = tiny_mote
    one = validate(model, ex[:2], 1, 2, tok.pad_token_id, model.config, "cpu", ex[:2])
    padded = validate(model, ex[:2], 3, 2, tok.pad_token_id, model.config, "cpu", ex[:2])  # 2 filler forwards
    assert torch.equal(one, padded)
    m = val_metrics(one)
    assert set(m) == {"val_loss", "val_loss_analysis", "val_loss_guidance", "val_loss_answer"}
    assert all(v > 0 for v in m.values())


def _chains(tmp_path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-0.parquet")
    return [tmp_path / "part-0.parquet"]


def _row(verdict, flagged, answer="a", error=None):
    return {"answer": answer, "kept": True, "flagged": flagged, "error": error, "verdict": verdict,
            "attempts": [{"stage": "answer", "verdict": verdict}]}


def test_flagged_chains_are_not_trained_on_by_default(tmp_path):
    from mote_ray.training.run import TrainConfig, count_usable

    assert TrainConfig().include_flagged is False
    rows = [_row("safe", False), _row("unsafe", True), _row("unparseable", True), _row("safe", False, answer=None),
            _row("safe", False, error="boom")]
    usable, dropped, flagged = count_usable(_chains(tmp_path, rows), TrainConfig().include_flagged)
    # Some verdicts parse, so the check works: unsafe and unparseable chains are both left out.
    assert usable == 1 and dropped == {"flagged": 2, "no_answer": 1, "error": 1}
    assert flagged["unsafe"] == 1 and flagged["unparseable"] == 1 and not flagged["train_unparseable"]
    assert [drop_reason(r, True) for r in rows] == [None, None, None, "no_answer", "error"]


def test_unparseable_chains_train_when_no_verdict_in_the_set_parses(tmp_path, capsys):
    """A model that never writes a parseable verdict (the tiny one): its check gives no signal, so
    unparseable chains train (with a warning and a record); UNSAFE ones never do by default."""
    from mote_ray.training.data import flag_policy, flag_warning
    from mote_ray.training.run import count_usable

    rows = [_row("unparseable", True) for _ in range(3)] + [_row("unparseable", True, error="boom")]
    usable, dropped, flagged = count_usable(_chains(tmp_path, rows), False)
    assert usable == 3 and dropped == {"error": 1}
    assert flagged["unparseable"] == 3 and flagged["train_unparseable"] and "no verdict" in flagged["policy"]
    assert "WARNING" in flag_warning(flagged)
    # One parseable verdict anywhere in the set (here an earlier attempt) turns the check back on.
    rows[0]["attempts"] = [{"stage": "direct", "verdict": "unsafe"}, {"stage": "answer", "verdict": "unparseable"}]
    p = flag_policy(rows, False)
    assert not p["train_unparseable"] and flag_warning(p) is None
    assert [drop_reason(r, False, p["train_unparseable"]) for r in rows[:3]] == ["flagged"] * 3
    # A verdict that says UNSAFE is excluded even when every other verdict is unparseable.
    mixed = [_row("unparseable", True), {**_row("unsafe", True), "attempts": []}]
    assert not flag_policy(mixed, False)["train_unparseable"]
    # include_flagged still trains on all of them.
    assert flag_policy(mixed, True)["train_unsafe"] and drop_reason(mixed[1], True) is None


def test_trainable_state_loads_strictly(tiny_mote):
    model, _, _ = tiny_mote
    state = model.trainable_state_dict()
    model.load_trainable_state_dict(state)
    with pytest.raises(ValueError, match="unexpected"):
        model.load_trainable_state_dict({**state, "lm.extra": torch.zeros(1)})
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        model.load_trainable_state_dict({k: v for k, v in state.items() if k != key})


def test_mlflow_store_holds_the_logged_metrics(tmp_path):
    from mlflow.tracking import MlflowClient

    from mote_ray.training.tracking import Tracker, resolve_mlflow_uri

    uri = resolve_mlflow_uri("default", tmp_path)
    t = Tracker({"mlflow": uri}, True, "unit", params={"lr": 0.1})
    for step in (1, 2):
        t.log({"loss": 3.0 / step, "lr": 0.1, "note": "text is skipped"}, step)
    t.finish()
    client = MlflowClient(uri)
    hist = client.get_metric_history(t.run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(1, 3.0), (2, 1.5)]
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.1"


_RETAINED = """
import sys, psutil, torch
from mote_ray.training.loop import return_large_frees_to_os
if sys.argv[1] == "fixed":
    assert return_large_frees_to_os()
rss = lambda: psutil.Process().memory_info().rss / 2**20
first = torch.ones(20 * 2**18)  # 20 MiB, freed: glibc's dynamic threshold rises past 16 MiB
del first
layer = torch.ones(16 * 2**18)  # an all-gathered layer (16 MiB) ...
keep = torch.ones(2**12)  # ... then a small tensor that outlives it (an activation)
before = rss()
del layer  # reshard
print(before - rss())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_freed_layer_buffers_return_to_the_os():
    """FSDP2 frees each layer's all-gathered parameters after the layer; with glibc's dynamic mmap
    threshold they stay resident (a rank's RSS grew by the whole unsharded model in one forward, so
    2 ranks peaked like 1). The training workers fix the threshold (loop.return_large_frees_to_os)."""
    def released(mode):
        out = subprocess.run([sys.executable, "-c", _RETAINED, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    assert released("default") < 4  # the mechanism: the freed 16 MiB stays in the heap
    assert released("fixed") > 12  # fixed threshold: the 16 MiB goes back to the OS


def test_report_polling_is_fast_during_fit_and_keeps_a_user_value(monkeypatch):
    """Ray's 2 s controller poll held every per-step report (training/conventions.py)."""
    import os

    from mote_ray.training.conventions import REPORT_POLL_S, report_polling

    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    monkeypatch.delenv(key, raising=False)
    with report_polling():
        assert os.environ[key] == REPORT_POLL_S and float(REPORT_POLL_S) < 2.0
    assert key not in os.environ
    monkeypatch.setenv(key, "5")
    with report_polling():
        assert os.environ[key] == "5"
    assert os.environ[key] == "5"


def test_trl_precision_follows_the_drivers_device_choice_not_what_the_worker_sees(monkeypatch):
    """A CPU worker on a GPU node still sees CUDA (Ray leaves CUDA_VISIBLE_DEVICES alone for 0-GPU
    workers): the aligner/DPO precision comes from the driver's use_gpu decision."""
    import torch

    from mote_ray.training.conventions import precision_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision_args(False) == {"use_cpu": True, "bf16": False, "fp16": False}
    assert precision_args(True) == {"use_cpu": False, "bf16": True, "fp16": False}


def test_shared_storage_check_passes_a_single_node_cluster(ray_local, tmp_path):
    """One node: every local path is visible to the workers, nothing is refused (the multi-node
    refusal needs a second node; not testable here)."""
    from mote_ray.training.conventions import check_shared_storage

    check_shared_storage({"storage_path": str(tmp_path / "ray"), "tracking.mlflow": (tmp_path / "mlruns").as_uri()})
    assert not any(tmp_path.rglob(".mote-shared-*"))
