"""`mote-ray anchored pairs`: tasks -> N samples each -> judged -> anchored + rank pairs (Ray Data).

    OUT/samples.jsonl   every sample, valid or not (with the reason), its correctness and judge score
    OUT/pairs.jsonl     anchored and rank pairs: prompt (as the model sees it), chosen, rejected, split
    OUT/stats.json      categories, pairs per kind, no-pair reasons, malformed reasons, judge parse failures
    OUT/rejects.jsonl   task rows that could not be read
"""

from __future__ import annotations

import json
import random
import zlib
from collections import Counter
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from mote_ray.config import EngineConfig


class PairsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    engine: EngineConfig = EngineConfig()  # the model the pairs are sampled from
    judge_model: str | None = None  # explanation judge + consultant; None = the same (base) model
    n: int = Field(4, ge=2)  # samples per prompt
    temperature: float = Field(0.8, gt=0)
    explanation_tokens: int = Field(96, ge=4)
    response_tokens: int = Field(64, ge=1)
    on_truncated: Literal["close", "reject"] = "close"
    held_out: float = Field(0.2, ge=0, lt=1)  # share of prompts whose pairs are kept for evaluation
    seed: int = 0


class AnchoredStage:
    """Ray Data actor: sample, check correctness, judge, and write consultants for one batch of tasks."""

    def __init__(self, config: dict):
        from mote_ray.anchored.sample import ExplanationJudge, Sampler
        from mote_ray.engines import create_engine

        self.cfg = cfg = PairsConfig(**config)
        self.engine = create_engine(cfg.engine)
        judge_engine = self.engine if not cfg.judge_model else create_engine(
            cfg.engine.model_copy(update={"model": cfg.judge_model}))
        self.judge_engine = judge_engine
        self.sampler = Sampler(self.engine, cfg.n, cfg.temperature, cfg.explanation_tokens, cfg.response_tokens,
                               cfg.on_truncated, cfg.seed)
        self.judge = ExplanationJudge(judge_engine)
        self.refusal = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from mote_ray.anchored.data import Task
        from mote_ray.anchored.sample import consultant, mark_correct

        tasks = [Task(**{**r, "choices": json.loads(r["choices"])}) for r in batch.to_pylist()]
        by_id = {t.id: t for t in tasks}
        samples = self.sampler.sample(tasks)
        self.refusal = mark_correct(by_id, samples, self.refusal)
        valid = [s for s in samples if s["valid"]]
        for s, score in zip(valid, self.judge.score(by_id, valid)):
            s["score"] = score
        wrong_everywhere = [t for t in tasks if all(not s["correct"] for s in samples if s["task_id"] == t.id and s["valid"])
                            and any(s["valid"] for s in samples if s["task_id"] == t.id)]
        consultants = consultant(self.judge_engine, wrong_everywhere, self.cfg.explanation_tokens,
                                 self.cfg.response_tokens) if wrong_everywhere else {}
        rows = []
        for s in samples:
            t = by_id[s["task_id"]]
            rows.append({"task_id": t.id, "index": s["index"], "kind": t.kind, "gold": t.gold, "text": s["text"],
                         "valid": s["valid"], "reason": s["reason"], "truncated": s["truncated"],
                         "answer": s.get("choice") or s.get("response"), "correct": bool(s.get("correct")),
                         "score": s.get("score"), "prompt": t.prompt(), "instruction_prompt": _rendered(self.engine, t),
                         "consultant": consultants.get(t.id) if s["index"] == 0 else None,
                         "judge_parse_failures": 0})
        rows[-1]["judge_parse_failures"] = self.judge.parse_failures.pop("explanation", 0)  # this batch's count
        return pa.Table.from_pylist(rows)

def _rendered(engine, task) -> str:
    from mote_ray.anchored.sample import instruction
    from mote_ray.chat import render
    from mote_ray.records import GenerationRequest

    return render(engine.tokenizer, GenerationRequest(messages=[{"role": "user", "content": instruction(task)}]))


def run_pairs(config: PairsConfig, tasks, out: str | Path, rejects=()) -> dict:
    import ray

    from mote_ray.anchored.pairs import Sample, build_pairs
    from mote_ray.cluster import init_ray
    from mote_ray.config import PoolConfig
    from mote_ray.engine_stage import map_engine

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rejects.jsonl", "w") as f:
        for r in rejects:
            f.write(json.dumps(r.model_dump()) + "\n")
    init_ray()
    ds = ray.data.from_items([{"id": t.id, "question": t.question, "gold": t.gold, "kind": t.kind,
                               "choices": json.dumps(t.choices)} for t in tasks])
    rows = map_engine(ds, config.engine, PoolConfig(batch_size=16), stage=AnchoredStage,
                      stage_kwargs={"config": config.model_dump()}).take_all()
    rows.sort(key=lambda r: (r["task_id"], r["index"]))
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = [Sample(r["task_id"], r["index"], r["text"], r["correct"], r["score"]) for r in rows if r["valid"]]
    consultants = {r["task_id"]: r["consultant"] for r in rows if r["consultant"]}
    pairs, stats = build_pairs(samples, consultants, config.seed)
    prompts = {r["task_id"]: r["instruction_prompt"] for r in rows}
    with open(out / "pairs.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": prompts[p.task_id], "chosen": p.chosen, "rejected": p.rejected,
                                "task_id": p.task_id, "kind": p.kind, "category": p.category,
                                "chosen_score": p.chosen_score, "rejected_score": p.rejected_score,
                                "split": _split(p.task_id, config.held_out, config.seed)}) + "\n")
    stats.update(tasks=len(tasks), samples=len(rows), valid_samples=len(samples), rejects=len(rejects),
                 malformed=dict(Counter(r["reason"] for r in rows if not r["valid"])),
                 judge_parse_failures=sum(r["judge_parse_failures"] for r in rows),
                 accuracy=sum(r["correct"] for r in rows if r["valid"]) / max(len(samples), 1))
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _split(task_id: str, held_out: float, seed: int) -> str:
    return "held_out" if random.Random(seed * 7919 + zlib.crc32(task_id.encode())).random() < held_out else "train"
