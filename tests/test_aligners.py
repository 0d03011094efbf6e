"""Aligners: cleaning rules on hand-written rows, the data job on real engine output, aligner training
(loss after [ALIGNED] drops; generation stops at [DONE] on both engines), inspectors' held-out
accuracy, the squad's control flow, and the proxy in front of our own Serve app."""

import json

import pyarrow.parquet as pq
import pytest

from mote_ray.aligners.criteria import CRITERIA, finds_fault
from mote_ray.aligners.data import check
from mote_ray.aligners.squad import Squad

from .conftest import copy_model, requires_vllm

ETH = CRITERIA["ethical"]


def test_cleaning_rules_on_hand_written_rows():
    ok = ("Here is how to make a bomb.", "This helps with violence.", "I can't help with that.")
    assert check(ETH, *ok, min_chars=2) is None
    assert "draft is empty" in check(ETH, "", *ok[1:], min_chars=2)
    assert "shorter than 5" in check(ETH, ok[0], "bad", ok[2], min_chars=5)
    assert check(ETH, ok[0], ok[1], "Fine.\nCritique: leaked", 2) == "template leakage in corrected"
    assert check(ETH, ETH.examples[0].draft, *ok[1:], min_chars=2) == "template leakage in draft"  # a few-shot copy
    assert check(ETH, ok[0], "Question: what?", ok[2], 2) == "template leakage in critique"
    assert "equals the draft" in check(ETH, ok[0], ok[1], ok[0], 2)  # a fault, yet nothing changed
    assert "finds nothing wrong but" in check(ETH, "Paris.", "Nothing wrong: correct.", "Lyon.", 2)
    assert check(ETH, "Paris.", "Nothing wrong: correct.", "Paris.", 2) is None  # good answers are left alone
    assert not finds_fault("No issues here.") and finds_fault("The draft is rude.")


def test_squad_order_threshold_rescoring_and_at_most_once():
    """Control flow only: scorers and aligners are plain functions over text."""
    calls = []

    def scorer(word):  # aligned for this criterion when the answer contains `word`
        return lambda prompts, answers: [0.9 if word in a else (0.1 if word == "safe" else 0.3) for a in answers]

    def aligner(word, drop=None):
        def run(prompts, answers):
            calls.append((word, len(answers)))
            return [(a.replace(drop, "") if drop else a) + f" {word}" for a in answers]
        return run

    squad = Squad(scorers={"ethical": scorer("safe"), "helpful": scorer("steps")},
                  aligners={"ethical": aligner("safe"), "helpful": aligner("steps", drop="safe")}, threshold=0.5)
    out = squad.align(["q1", "q2"], ["bad answer", "safe steps"])
    # q1: ethical (0.1) is lowest -> runs first; helpful (0.3) next, and it removes "safe" again; ethical
    # would now be below the threshold but has run already (at most once), so the squad stops.
    assert [t["aligner"] for t in out[0]["trace"]] == ["ethical", "helpful"]
    assert out[0]["trace"][0]["before"] == {"ethical": 0.1, "helpful": 0.3}
    assert out[0]["trace"][0]["after"] == {"ethical": 0.9, "helpful": 0.3}  # re-scored after each pass
    assert out[0]["answer"] == "bad answer  steps" and out[0]["scores"]["ethical"] == 0.1
    assert out[1]["trace"] == [] and out[1]["answer"] == "safe steps"  # above the threshold: untouched
    assert calls == [("safe", 1), ("steps", 1)]  # batched per pass, only the samples that need it


@pytest.fixture(scope="module")
def squad_dir(ray_local, tiny_model_hd32, tmp_path_factory, datasets_dir):
    """Data from the real tiny model, then aligners + inspectors; plus a fixture criterion whose
    corrected answer is always "OK." so the aligner can learn to stop at [DONE]."""
    from mote_ray.aligners.data import AlignerDataConfig, run_aligner_data
    from mote_ray.aligners.train import AlignerTrainConfig, run_aligner_train

    d = tmp_path_factory.mktemp("aligners")
    q = d / "q.jsonl"
    import csv

    rows = list(csv.DictReader(open(datasets_dir / "advbench/harmful_behaviors.csv")))[:12]
    q.write_text("".join(json.dumps({"prompt": r["goal"]}) + "\n" for r in rows) + '{"prompt": ""}\n')
    stats = run_aligner_data(AlignerDataConfig(engine={"model": tiny_model_hd32, "engine": "transformers"},
                                               criteria=["ethical", "helpful"], topics=["cooking"],
                                               questions_per_topic=2,
                                               max_tokens={"draft": 32, "critique": 24, "corrected": 32}), [str(q)], d / "data")
    # LoRA here (the okay fixture below is a full fine-tune): the merged aligners must load in both engines.
    squad = run_aligner_train(AlignerTrainConfig(model=tiny_model_hd32, method="lora", lora_r=8, max_steps=8, lr=1e-2,
                                                 batch_size=8),
                              d / "data", d / "squad")
    return d, stats, squad


def test_data_job_on_real_engine_output(squad_dir):
    d, stats, _ = squad_dir
    topic = [json.loads(line) for line in (d / "data/topic_questions.jsonl").open()]
    assert len(topic) == 2 and all(t["topic"] == "cooking" for t in topic)  # written by the model
    assert topic[0]["prompt"] != topic[1]["prompt"]  # each ask has its own seed (one seed gave twins)
    # 12 questions + the usable topic ones, x 2 criteria; the empty question and any unusable topic
    # question are rejects with their reasons.
    unusable = sum(not t["prompt"].strip() for t in topic)
    assert stats["input_rejects"] == 1 + unusable and stats["rows"] == 2 * (12 + 2 - unusable)
    assert set(stats["per_criterion"]) == {"ethical", "helpful"}
    rows = [r for f in sorted((d / "data/data").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    for r in rows:
        assert (r["kept"] and r["reason"] is None) or (not r["kept"] and r["reason"])
        if r["kept"]:
            assert check(CRITERIA[r["criterion"]], r["draft"], r["critique"], r["corrected"], 2) is None
    rejects = [json.loads(line) for line in (d / "data/rejects.jsonl").open()]
    assert any(r["stage"] == "input" and "empty" in r["reason"] for r in rejects)


def test_aligner_training_lowers_the_loss_after_aligned_and_inspectors_score(squad_dir):
    _, _, squad = squad_dir
    for criterion, m in squad["metrics"].items():
        a = m["aligner"]
        # The training loss falls; the held-out loss is measured and reported, but the tiny model's own
        # story text as y' makes no promise that it falls (CI saw 3.02 -> 3.13 on one seed): that it
        # falls on rows the aligner never saw is asserted on the okay fixture below, whose y' is learnable.
        assert a["last_loss"] < a["first_loss"], criterion
        assert all(isinstance(a[k], float) and a[k] > 0 for k in ("held_out_loss_before", "held_out_loss_after"))
        i = m["inspector"]
        # Held out by pair: both texts of each held-out pair, so AUC is defined (separability is
        # tested on a fixture below; the tiny model's drafts make no promise about it).
        assert i["pairs"] >= 4 and i["held_out_rows"] >= 2 and i["held_out_rows"] % 2 == 0 and i["auc"] is not None


@pytest.fixture(scope="module")
def okay_run(ray_local, tiny_model_hd32, tmp_path_factory):
    """A fixture criterion whose y' is always "OK.": the aligner learns to write it and stop at [DONE].
    Two DDP workers on 15 rows (uneven shards: 8/7), epoch-driven (no max_steps, which HF would run
    on every rank whatever the shards), the Ray Train run in a storage_path outside OUT."""
    from mote_ray.aligners.train import AlignerTrainConfig, train_aligner

    rows = [{"question": f"Question {i}?", "draft": f"Draft {i}.", "corrected": "OK."} for i in range(15)]
    d = tmp_path_factory.mktemp("okay")
    cfg = AlignerTrainConfig(model=tiny_model_hd32, max_steps=None, epochs=3, lr=1e-2, batch_size=1, workers=2,
                             storage_path=str(d / "storage"))
    held = [{"question": f"Question {i}?", "draft": f"Draft {i}.", "corrected": "OK."} for i in (97, 98)]  # unseen
    metrics = train_aligner(cfg, "okay", rows, held, d / "squad")
    return d, metrics


@pytest.fixture(scope="module")
def okay_aligner(okay_run):
    return okay_run[0] / "squad" / "aligners" / "okay"


def test_aligner_outputs_come_back_through_the_checkpoint_and_mlflow_holds_the_run(okay_run):
    """Workers never write to the driver's OUT: rank 0 reports its outputs as the run's checkpoint in
    storage_path, the driver copies them in. Two ranks on 15 rows finish (equal steps per rank)."""
    import os

    from mlflow.tracking import MlflowClient

    d, m = okay_run
    # the run's directory is unique per OUT (a shared storage_path never mixes two jobs' runs)
    checkpoints = [c for c in (d / "storage").glob("aligner-okay-*/checkpoint_*") if c.is_dir()]
    assert len(checkpoints) == 1 and (checkpoints[0] / "aligner_metrics.json").is_file()
    out = d / "squad" / "aligners" / "okay"
    assert (out / "model.safetensors").is_file() and (out / "aligner_metrics.json").is_file()
    assert not (d / "squad" / "ray").exists()  # the run went to storage_path, not under OUT
    # 15 rows on 2 ranks, batch 1: ceil(15 / 2) = 8 steps per epoch on both ranks (the short shard padded)
    assert m["workers"] == 2 and m["steps_per_rank"] == [24, 24] and len(m["history"]) == 24
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(m["mlflow"]["tracking_uri"])
    assert m["mlflow"]["tracking_uri"] == (d / "squad" / "mlruns").as_uri()
    run = client.get_run(m["mlflow"]["run_id"])
    assert run.info.run_name == "aligner-okay" and run.info.status == "FINISHED"
    assert [x.step for x in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 25))
    assert run.data.metrics["held_out_loss_after"] == pytest.approx(m["held_out_loss_after"])
    # rows it never trained on: learning to write "OK." [DONE] after [ALIGNED] lowers their loss
    assert m["held_out_rows"] == 2 and m["held_out_loss_after"] < 0.5 * m["held_out_loss_before"]


def test_aligner_loss_is_on_the_completion_only(tiny_model_hd32, tmp_path):
    """TRL's prompt-completion rows: labels cover exactly y' [DONE] (nothing appended after [DONE]),
    -100 on the prompt x [INIT] y [ALIGNED] and on padding."""
    from mote_ray.aligners.train import AlignerTrainConfig, sft_trainer

    cfg = {**AlignerTrainConfig(max_steps=1).model_dump(), "base": tiny_model_hd32}
    rows = [{"question": "Question 1?", "draft": "Draft 1.", "corrected": "OK."},
            {"question": "Why is the sky blue on a clear day?", "draft": "No idea.", "corrected": "Light scatters."}]
    trainer = sft_trainer(cfg, rows, [], str(tmp_path))
    tok = trainer.processing_class
    aligned, done = tok.convert_tokens_to_ids(["[ALIGNED]", "[DONE]"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for ids, labels, mask, row in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], rows):
        ids, labels, n = ids.tolist(), labels.tolist(), int(mask.sum())
        start = ids.index(aligned) + 1  # the completion starts right after [ALIGNED]
        assert labels[:start] == [-100] * start and labels[n:] == [-100] * (len(ids) - n)
        assert labels[start:n] == ids[start:n] and ids[n - 1] == done  # y' then [DONE], last real token
        assert tok.decode(ids[start:n - 1]).strip() == row["corrected"]


def test_lora_aligner_trains_the_marker_rows_of_lm_head(tiny_model_hd32, tmp_path):
    """The tiny model's embeddings are untied and `all-linear` leaves lm_head out: the markers' output
    rows must train too (merged on save), or [DONE]'s logit stays at its random initial value."""
    import torch

    from mote_ray.aligners.train import AlignerTrainConfig, sft_trainer

    cfg = {**AlignerTrainConfig(method="lora", lora_r=4, max_steps=2, lr=1e-2, batch_size=2).model_dump(),
           "base": tiny_model_hd32}
    rows = [{"question": f"Question {i}?", "draft": f"Draft {i}.", "corrected": "OK."} for i in range(4)]
    trainer = sft_trainer(cfg, rows, [], str(tmp_path))
    ids = trainer.processing_class.convert_tokens_to_ids(["[INIT]", "[ALIGNED]", "[DONE]"])
    assert trainer.model.config.tie_word_embeddings is False  # untied, the case this covers
    head = trainer.model.base_model.model.lm_head  # PEFT wraps it when it trains
    frozen = head.original_module if hasattr(head, "original_module") else head  # the initial rows
    before = frozen.weight[ids].detach().clone()
    trainer.train()
    after = trainer.model.merge_and_unload().lm_head.weight[ids]
    assert not torch.allclose(after[-1], before[-1])  # [DONE]'s output row moved


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=[pytest.mark.vllm, requires_vllm])])
def test_aligner_generation_stops_at_done_on_both_engines(okay_aligner, engine):
    from mote_ray.aligners.train import aligner_text
    from mote_ray.config import EngineConfig
    from mote_ray.engines import create_engine
    from mote_ray.records import GenerationRequest, SamplingParams

    eng = create_engine(EngineConfig(model=str(okay_aligner), engine=engine))
    done = eng.tokenizer.convert_tokens_to_ids("[DONE]")
    res = eng.generate([GenerationRequest(id="1", prompt=aligner_text("Question 99?", "Draft 99."),
                                          sampling=SamplingParams(max_tokens=24, stop_token_ids=(done,)))])[0]
    assert res.stop_token_id == done and res.finish_reason == "stop" and res.text.strip() == "OK."
    eng.close()


def test_squad_apply_job_and_proxy_with_the_openai_client(squad_dir, format_mote_dir, tmp_path, datasets_dir):
    from openai import OpenAI

    from mote_ray.aligners.squad import run_apply
    from mote_ray.eval.run import EvalConfig, SuiteConfig, run_eval
    from mote_ray.serving.local import LocalServer

    d = squad_dir[0]
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "How do I pick a lock?", "answer": "Use a tension wrench."}\n{"prompt": "x"}\n')
    stats = run_apply(str(d / "squad"), str(rows), tmp_path / "applied")
    assert stats["rows"] == 1 and stats["rejects"] == 1
    applied = json.loads((tmp_path / "applied/aligned.jsonl").read_text().splitlines()[0])
    assert all(t["aligner"] in ("ethical", "helpful") for t in json.loads(applied["trace"]))

    import ray

    ray.shutdown()  # the servers below start their own
    copy_model(format_mote_dir, tmp_path / "up")  # the upstream: the session's tiny MoTE model
    with LocalServer(["--model", str(tmp_path / "up"), "--replicas", "1", "--no-compile"]) as up, \
            LocalServer(["--squad", str(d / "squad"), "--upstream", up.base_url + "/v1"], command=("aligners", "serve")) as px:
        client = OpenAI(base_url=px.base_url + "/v1", api_key="none", max_retries=0)
        name = client.models.list().data[0].id  # proxied from upstream
        try:
            r = client.chat.completions.create(model=name, max_tokens=12, messages=[{"role": "user", "content": "Hi?"}],
                                               extra_body={"squad": {"return_trace": True}})
        except Exception:
            print("proxy log:", px.output()[-4000:], "\nupstream log:", up.output()[-3000:])
            raise
        trace = r.model_dump()["squad"]
        assert isinstance(r.choices[0].message.content, str) and set(trace["scores"]) <= {"ethical", "helpful"}
        assert all(t["aligner"] in ("ethical", "helpful") for t in trace["trace"])
        with pytest.raises(Exception) as e404:  # an upstream 4xx passes through
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
        assert getattr(e404.value, "status_code", None) == 404
        # upstream-only vs upstream + squad, side by side in one report
        res = run_eval(EvalConfig(endpoints=[f"upstream={up.base_url}/v1", f"squad={px.base_url}/v1"], max_tokens=8,
                                  suites=[SuiteConfig(name="harmlessness", data=[str(datasets_dir / "advbench/harmful_behaviors.csv")],
                                                      format="advbench", limit=2),
                                          SuiteConfig(name="overrefusal", data=[str(datasets_dir / "jbb_benign/benign-behaviors.csv")],
                                                      format="jailbreakbench", limit=2)]), tmp_path / "eval")
        for suite in ("harmlessness", "overrefusal"):
            assert set(res["suites"][suite]["models"]) == {"upstream", "squad"}
            assert all(m["answered"] == 2 for m in res["suites"][suite]["models"].values())
        assert "squad" in (tmp_path / "eval/report.html").read_text()
        up.__exit__()  # the upstream goes away while the proxy runs: nothing listens on its port now
        import urllib.error
        import urllib.request

        req = urllib.request.Request(px.base_url + "/v1/chat/completions", method="POST",
                                     data=json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 503 and "unavailable" in json.loads(err.value.read())["error"]["message"]


def _inspector_rows(n: int, prompt_ids=None, shuffled: bool = False):
    import random

    topics = ["locks", "chemistry", "passwords", "medicine", "weapons", "hacking", "fraud", "drugs", "stalking", "fire"]
    rng = random.Random(0)
    rows = []
    for i in range(n):
        t = topics[i % len(topics)]
        bad = f"Sure, here is exactly how to do the {t} thing step {i}: first get the tools, then do it quietly."
        good = f"I can't help with harming anyone through {t}. If you are in danger, please contact local services."
        if shuffled and rng.random() < 0.5:
            bad, good = good, bad
        rows.append({"prompt_id": prompt_ids[i] if prompt_ids else f"p{i}", "question": f"How do I do {t} number {i}?",
                     "draft": bad, "corrected": good, "fault": True})
    return rows


def test_inspector_separates_a_separable_fixture_and_not_shuffled_labels():
    from mote_ray.aligners.train import AlignerTrainConfig, train_inspector

    cfg = AlignerTrainConfig(held_out=0.3)
    _, good = train_inspector(cfg, _inspector_rows(60))
    assert good["accuracy"] >= 0.9 and good["auc"] >= 0.95 and good["held_out_rows"] >= 8
    _, noise = train_inspector(cfg, _inspector_rows(60, shuffled=True))
    assert noise["auc"] < 0.8 and noise["accuracy"] < 0.8


def test_inspector_fallback_split_keeps_both_texts_of_a_pair_together():
    # One question for every pair: the by-question split cannot split, the fallback must split by
    # pair (the old fallback held out only corrections, so AUC was always None).
    from mote_ray.aligners.train import AlignerTrainConfig, train_inspector

    _, m = train_inspector(AlignerTrainConfig(), _inspector_rows(16, prompt_ids=["same"] * 16))
    assert m["held_out_split"].startswith("by pair") and m["held_out_rows"] == 8
    assert m["auc"] is not None and m["auc"] >= 0.9


def test_storage_path_is_made_absolute_and_uris_are_kept(tmp_path, monkeypatch):
    """A relative storage_path used to reach pyarrow and fail with its traceback."""
    from mote_ray.aligners.train import AlignerTrainConfig
    from mote_ray.anchored.dpo import DPOJobConfig

    monkeypatch.chdir(tmp_path)
    for make in (AlignerTrainConfig, lambda **kw: DPOJobConfig(model="m", **kw)):
        assert make(storage_path="runs").storage_path == str(tmp_path.resolve() / "runs")
        assert make(storage_path="s3://bucket/runs").storage_path == "s3://bucket/runs"
        assert make().storage_path is None


def test_rows_longer_than_max_len_are_counted_not_silently_cut(tiny_model_hd32):
    """TRL would cut a long row's completion (losing [DONE]) or drop it silently: such rows are
    left out and counted before training."""
    from mote_ray.aligners.train import fitting_rows

    short = {"question": "Question 1?", "draft": "Draft 1.", "corrected": "OK."}
    long = {"question": "Why? " * 200, "draft": "Draft.", "corrected": "OK."}
    kept, over = fitting_rows(tiny_model_hd32, [short, long, short], 64)
    assert kept == [short, short] and over == 1
    assert fitting_rows(tiny_model_hd32, [long], 4096) == ([long], 0)
