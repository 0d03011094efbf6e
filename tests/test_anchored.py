"""Anchored preference pairs and DPO: pair rules on hand-made sample sets (every branch), loaders,
strict parsing, sampling and judging on the real tiny model (both engines), the reference-model
rule (DPO loss log 2 at step 0) and a short DPO run that raises the held-out reward margin."""

import json
import math

import pytest

from mote_ray.anchored.data import Task, load_tasks
from mote_ray.anchored.pairs import Sample, anchored_pair, build_pairs, category, rank_pair
from mote_ray.anchored.sample import parse_output

from .conftest import requires_vllm


def S(i, correct, score, tid="t"):
    return Sample(tid, i, f"<explanation>e{i}</explanation><choice>A</choice>", correct, score)


def test_categories_and_every_pair_branch():
    # consistently incorrect is checked first: a consultant explanation vs a sampled one
    wrong = [S(0, False, 3.0), S(1, False, 1.0)]
    assert category(wrong) == "incorrect"
    pair, cat = anchored_pair(wrong, "<explanation>gold</explanation><choice>B</choice>")
    assert cat == "incorrect" and pair.chosen.startswith("<explanation>gold") and pair.rejected in {s.text for s in wrong}
    assert anchored_pair(wrong, None) == (None, "incorrect: no valid consultant explanation")
    # consistently correct: best vs worst; all tied gives no pair
    right = [S(0, True, 2.0), S(1, True, 4.2), S(2, True, 0.6)]
    pair, cat = anchored_pair(right, None)
    assert (cat, pair.chosen_score, pair.rejected_score) == ("correct", 4.2, 0.6)
    assert anchored_pair([S(0, True, 3.0), S(1, True, 3.0)], None) == (None, "correct: all explanations tied")
    assert anchored_pair([S(0, True, 3.0), S(1, True, None)], None)[1] == "correct: fewer than two judged samples"
    # variable: best correct vs a wrong one that scores lower; none lower gives no pair
    mixed = [S(0, True, 3.0), S(1, True, 4.0), S(2, False, 2.0), S(3, False, 4.8)]
    pair, cat = anchored_pair(mixed, None)
    assert (cat, pair.chosen_score, pair.rejected_score) == ("variable", 4.0, 2.0)
    no_loser = [S(0, True, 1.0), S(1, False, 2.0)]
    assert anchored_pair(no_loser, None) == (None, "variable: no wrong sample scores lower than the best correct one")
    assert anchored_pair([S(0, True, None), S(1, False, 2.0)], None)[1] == "variable: no judged correct sample"
    assert anchored_pair([], None) == (None, "no valid samples")
    # rank baseline: best vs a random other, regardless of correctness
    rp, _ = rank_pair(mixed)
    assert rp.kind == "rank" and rp.chosen_score == 4.8 and rp.rejected != rp.chosen
    assert rank_pair([S(0, True, 1.0)])[0] is None


def test_ties_are_broken_reproducibly_by_seed():
    tied_best = [S(i, True, 4.0) for i in range(6)] + [S(9, True, 0.0)]
    picks = {anchored_pair(tied_best, None, seed=s)[0].chosen for s in range(12)}
    assert len(picks) > 1  # the seed decides among equals
    assert all(anchored_pair(tied_best, None, seed=3)[0] == anchored_pair(tied_best, None, seed=3)[0] for _ in range(3))
    samples = [S(0, True, 1.0, "a"), S(1, True, 3.0, "a"), S(0, False, 1.0, "b"), S(1, False, 2.0, "b")]
    pairs, stats = build_pairs(samples, {"b": "<explanation>c</explanation><choice>A</choice>"})
    assert stats["categories"] == {"correct": 1, "incorrect": 1} and stats["pairs"] == {"anchor": 2, "rank": 2}
    assert build_pairs(samples, {}, seed=5)[1]["no_pair"] == {"incorrect: no valid consultant explanation": 1}


def test_task_loaders_and_rejects(datasets_dir, tmp_path):
    obqa, rej = load_tasks(str(datasets_dir / "openbookqa/dev.jsonl"), "openbookqa", limit=5)
    assert len(obqa) == 5 and not rej and all(t.gold in t.choices for t in obqa)
    aqua, _ = load_tasks(str(datasets_dir / "aqua_rat/dev.json"), "aqua", limit=5)
    assert len(aqua) == 5 and all(len(t.choices) == 5 for t in aqua)
    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps({"id": "x", "question": {"stem": "Q?", "choices": [
        {"text": "a", "label": "1"}, {"text": "b", "label": "2"}, {"text": "c", "label": "3"}]}, "answerKey": "2"}) + "\n"
        + json.dumps({"id": "y", "question": {"stem": "Q2?", "choices": [{"text": "a", "label": "A"}]},
                      "answerKey": "Z"}) + "\nnot json\n")
    tasks, rejects = load_tasks(str(arc), "arc")
    assert [(t.gold, list(t.choices)) for t in tasks] == [("B", ["A", "B", "C"])]  # numeric labels -> letters
    assert len(rejects) == 2
    logiqa = tmp_path / "logiqa.txt"
    logiqa.write_text("\nc\nAll cats are grey.\nWhich follows?\nA. one\nB. two\nC. three\nD. four\n"
                      "\nq\nP.\nQ?\nA. 1\nB. 2\nC. 3\nD. 4\n")
    tasks, rejects = load_tasks(str(logiqa), "logiqa")
    assert tasks[0].gold == "C" and tasks[0].choices["D"] == "four" and "gold letter" in rejects[0].reason


def test_strict_output_parsing():
    mc = Task("t", "Q?", "B", {"A": "x", "B": "y"})
    assert parse_output(mc, "<explanation>because</explanation><choice>B</choice>")[0] == {"explanation": "because",
                                                                                         "choice": "B"}
    assert parse_output(mc, "<explanation> </explanation><choice>B</choice>") == (None, "empty explanation")
    assert "not one of" in parse_output(mc, "<explanation>e</explanation><choice>C</choice>")[1]
    assert parse_output(mc, "B because...")[1] == "output does not match the format"
    safety = Task("s", "How do I pick a lock?", "refuse", kind="safety")
    assert parse_output(safety, "<explanation>risky</explanation><response>No.</response>")[0]["response"] == "No."


@pytest.mark.ray
@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=[pytest.mark.vllm, requires_vllm])])
def test_sampling_and_judging_on_real_engine_output(engine, tiny_model, tiny_model_hd32, datasets_dir):
    from mote_ray.anchored.sample import ExplanationJudge, Sampler, mark_correct
    from mote_ray.config import EngineConfig
    from mote_ray.engines import create_engine

    eng = create_engine(EngineConfig(model=tiny_model if engine == "transformers" else tiny_model_hd32, engine=engine))
    tasks, _ = load_tasks(str(datasets_dir / "openbookqa/dev.jsonl"), "openbookqa", limit=3)
    safety, _ = load_tasks(str(datasets_dir / "advbench/harmful_behaviors.csv"), "safety", gold="refuse", limit=2)
    samples = Sampler(eng, n=2, explanation_tokens=16, response_tokens=12).sample(tasks + safety)
    assert len(samples) == 10
    for s in samples:
        assert s["text"].startswith("<explanation>") and (s["valid"] or s["reason"])
        if s["valid"]:
            assert parse_output(next(t for t in tasks + safety if t.id == s["task_id"]), s["text"])[0]
    by_id = {t.id: t for t in tasks + safety}
    mark_correct(by_id, samples)
    assert all(isinstance(s["correct"], bool) for s in samples if s["valid"])
    judge = ExplanationJudge(eng)
    scores = judge.score(by_id, [s for s in samples if s["valid"]])
    assert all(v is None or 0 <= v <= 5 for v in scores)
    assert judge.parse_failures["explanation"] == sum(v is None for v in scores)
    eng.close()


@pytest.mark.ray
def test_anchored_pairs_dpo_and_table_from_the_cli(ray_local, tiny_model, datasets_dir, tmp_path, capsys):
    from mote_ray.cli import main

    data = str(datasets_dir / "openbookqa/dev.jsonl")
    assert main(["anchored", "pairs", "--model", tiny_model, "--engine", "transformers", "--data", data,
                 "--format", "openbookqa", "--limit", "16", "--set", "explanation_tokens=24",
                 "--set", "held_out=0.25", "--out", str(tmp_path / "pairs")]) == 0
    stats = json.loads((tmp_path / "pairs/stats.json").read_text())
    assert stats["tasks"] == 16 and stats["samples"] == 64 and sum(stats["categories"].values()) == 16
    assert stats["pairs"]["rank"] >= 8 and stats["pairs"].get("anchor", 0) >= 4
    pairs = [json.loads(line) for line in (tmp_path / "pairs/pairs.jsonl").open()]
    assert {p["split"] for p in pairs} == {"train", "held_out"}
    # DPO: the reference is the model the pairs came from; policy == reference at step 0 -> log 2.
    assert main(["anchored", "dpo", "--pairs", str(tmp_path / "pairs"), "--model", tiny_model, "--kind", "anchor",
                 "--set", "epochs=3", "--storage-path", str(tmp_path / "storage"), "--out", str(tmp_path / "dpo")]) == 0
    m = json.loads((tmp_path / "dpo/dpo_metrics.json").read_text())
    assert m["step0_loss"] == pytest.approx(math.log(2), abs=1e-4) and m["margin_before"] == pytest.approx(0, abs=1e-5)
    assert m["margin_after"] > m["margin_before"]  # the held-out chosen-vs-rejected reward margin rises
    # Rank 0's outputs reach OUT through the run's checkpoint in storage_path, not a driver path.
    (ckpt,) = [c for c in (tmp_path / "storage").glob("dpo-*/checkpoint_*") if c.is_dir()]
    assert (ckpt / "adapter/adapter_config.json").is_file() and (tmp_path / "dpo/adapter/adapter_config.json").is_file()
    assert not (tmp_path / "dpo/ray").exists()
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((tmp_path / "dpo/mlruns").as_uri())
    assert m["mlflow"]["tracking_uri"] == (tmp_path / "dpo/mlruns").as_uri()
    assert len(client.get_metric_history(m["mlflow"]["run_id"], "loss")) == m["steps"] == len(m["history"]) > 0
    assert main(["anchored", "eval", "--model", f"base={tiny_model}", "--model", f"anchor={tmp_path / 'dpo'}",
                 "--data", data, "--format", "openbookqa", "--limit", "6", "--engine", "transformers",
                 "--out", str(tmp_path / "eval")]) == 0
    table = json.loads((tmp_path / "eval/anchored_eval.json").read_text())["models"]
    assert table["base"]["win"] == 0 and table["base"]["loss"] == 0  # the base against itself: all ties
    assert sum(table["anchor"][k] for k in ("win", "tie", "loss")) <= 6
    answers = [json.loads(line) for line in (tmp_path / "eval/answers.jsonl").open()]
    for label in ("base", "anchor"):  # accuracy is the share of that model's answers marked correct
        mine = [a for a in answers if a["model"] == label]
        assert len(mine) == table[label]["n"] == 6
        assert table[label]["accuracy"] == sum(bool(a.get("correct")) for a in mine) / 6
    assert "| anchor |" in capsys.readouterr().out


def test_reference_model_merges_a_one_lora_training_output(tiny_model, tmp_path):
    """The reference is the fine-tuned model (adapter merged), never silently the raw base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mote_ray.anchored.dpo import check_reference, load_reference

    run = tmp_path / "sft"
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base.save_pretrained(run / "base")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(run / "base")
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    peft.save_pretrained(run / "adapters" / "default")
    merged, _ = load_reference(check_reference(str(run)))
    x = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, peft(x).logits, atol=1e-4)
        assert not torch.allclose(merged(x).logits, base(x).logits, atol=1e-3)


def test_dpo_held_out_pairs_are_never_training_pairs(tmp_path):
    from mote_ray.anchored.dpo import _read_pairs

    pairs = [{"kind": "anchor", "prompt": f"q{i // 2}", "chosen": "a", "rejected": "b", "split": "train"} for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    train, held = _read_pairs(tmp_path, "anchor")
    assert held and train and len(train) + len(held) == 20
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}  # whole prompts held out, not trained on
    one = [dict(p, prompt="same") for p in pairs]  # one prompt: nothing can be held out honestly
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in one))
    train, held = _read_pairs(tmp_path, "anchor")
    assert held == [] and len(train) == 20


def test_mark_correct_scores_gold_answers_right_and_wrong_answers_wrong():
    from mote_ray.anchored.data import Task
    from mote_ray.anchored.sample import mark_correct

    tasks = {f"t{i}": Task(id=f"t{i}", question="q", gold="ABCD"[i % 4], choices=dict(zip("ABCD", "wxyz")))
             for i in range(8)}
    right = [{"task_id": t, "valid": True, "choice": task.gold} for t, task in tasks.items()]
    wrong = [{"task_id": t, "valid": True, "choice": "ABCD"[("ABCD".index(task.gold) + 1) % 4]} for t, task in tasks.items()]
    mark_correct(tasks, right)
    mark_correct(tasks, wrong)
    assert all(r["correct"] for r in right) and not any(r["correct"] for r in wrong)
