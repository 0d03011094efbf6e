"""The training recipe without Ray: accumulation, schedule, clipping, prompt split, data rules, strict state."""

import math

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


def test_flagged_chains_are_not_trained_on_by_default(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mote_ray.training.run import TrainConfig, count_usable

    assert TrainConfig().include_flagged is False
    rows = [{"answer": "a", "kept": True, "flagged": False, "error": None},
            {"answer": "a", "kept": True, "flagged": True, "error": None},
            {"answer": None, "kept": True, "flagged": False, "error": None},
            {"answer": "a", "kept": True, "flagged": False, "error": "boom"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-0.parquet")
    usable, dropped = count_usable([tmp_path / "part-0.parquet"], TrainConfig().include_flagged)
    assert usable == 1 and dropped == {"flagged": 1, "no_answer": 1, "error": 1}
    assert [drop_reason(r, True) for r in rows] == [None, None, "no_answer", "error"]


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
