"""`mote-ray aligners data`: synthetic (question, draft y, critique, corrected y') per criterion.

For each question and criterion, one prompt (the criterion's principles, its few-shot examples, the
question) is continued field by field in order — `Draft answer:`, `Critique:`, `Corrected answer:`,
each up to the next field's marker — so every field exists by construction even for a small model;
a free-form single call would leave a small model's fields to chance. Then the strict checks, each
failure a reason in OUT/rejects.jsonl (the row also stays in OUT/data with kept=false):
  - empty or non-text field; a field shorter than `min_chars`
  - template leakage: a field marker, a few-shot answer, or the prompt's headings inside a field
  - the critique finds a fault but y' equals y; or it finds none (opens "Nothing wrong") but y' differs
Resumable like the generation job (row ids are question hash + criterion); OUT/fingerprint.json
records what determines a row (data_fingerprint), and a rerun under another is refused, naming what
changed, unless `restart` (`--restart`) discards the old rows. Stats per criterion.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from mote_ray.aligners.criteria import CRITERIA, Criterion, finds_fault
from mote_ray.config import EngineConfig, PoolConfig

FIELDS = ("Draft answer:", "Critique:", "Corrected answer:")
LEAK_MARKERS = (*FIELDS, "Question:", "Principles:", "### User", "### Assistant")
SCHEMA = pa.schema([("id", pa.string()), ("prompt_id", pa.string()), ("criterion", pa.string()),
                    ("question", pa.string()), ("draft", pa.string()), ("critique", pa.string()),
                    ("corrected", pa.string()), ("fault", pa.bool_()), ("kept", pa.bool_()),
                    ("reason", pa.string()), ("model", pa.string()), ("engine", pa.string())])


class AlignerDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    engine: EngineConfig = EngineConfig()
    pool: PoolConfig = PoolConfig(batch_size=32)
    criteria: list[str] = Field(default_factory=lambda: ["ethical", "factual", "helpful"])
    max_tokens: dict[str, int] = Field(default_factory=lambda: {"draft": 96, "critique": 64, "corrected": 96})
    temperature: float = Field(0.7, ge=0)
    min_chars: int = Field(2, ge=1)
    # Questions written by the model from seed topics, besides (or instead of) prompt files.
    topics: list[str] = Field(default_factory=list)
    questions_per_topic: int = Field(4, ge=1)
    seed: int = 0


def build_prompt(c: Criterion, question: str, shots: int | None = None) -> str:
    examples = c.examples if shots is None else c.examples[:shots]
    shots = "\n\n".join(f"Question: {e.question}\nDraft answer: {e.draft}\nCritique: {e.critique}\n"
                        f"Corrected answer: {e.corrected}" for e in examples)
    rules = "\n".join(f"- {p}" for p in c.principles)
    return (f"Write a draft answer, critique it against the principles ({c.name}), then write a corrected "
            f"answer.\nPrinciples:\n{rules}\n\n{shots}\n\nQuestion: {question}")


def check(c: Criterion, draft: str, critique: str, corrected: str, min_chars: int) -> str | None:
    """The first cleaning rule a row breaks, or None."""
    fields = {"draft": draft, "critique": critique, "corrected": corrected}
    for name, text in fields.items():
        if not isinstance(text, str) or len(text.strip()) < min_chars:
            return f"{name} is empty or shorter than {min_chars} characters"
    shots = {e.draft for e in c.examples} | {e.corrected for e in c.examples} | {e.critique for e in c.examples}
    for name, text in fields.items():
        if any(m in text for m in LEAK_MARKERS) or text.strip() in shots:
            return f"template leakage in {name}"
    fault = finds_fault(critique)
    if fault and corrected.strip() == draft.strip():
        return "the critique finds a fault but the corrected answer equals the draft"
    if not fault and corrected.strip() != draft.strip():
        return "the critique finds nothing wrong but the corrected answer differs"
    return None


class CritiqueStage:
    """Ray Data actor: one engine; rows (id, prompt_id, question, criterion) in, SCHEMA rows out."""

    def __init__(self, config: dict):
        from mote_ray.engines import create_engine

        self.cfg = AlignerDataConfig(**config)
        self.engine = create_engine(self.cfg.engine)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from mote_ray.records import GenerationRequest, SamplingParams, request_seed

        rows, too_long = [], []
        for r in batch.to_pylist():
            (rows if self._fit(r) else too_long).append(r)
        texts = {r["id"]: "" for r in rows}
        got: dict[str, dict] = {r["id"]: {} for r in rows}
        for k, field in enumerate(FIELDS if rows else ()):
            key = ("draft", "critique", "corrected")[k]
            stop = (f"\n{FIELDS[k + 1]}",) if k + 1 < len(FIELDS) else ("\nQuestion:", "\n\n")
            reqs = [GenerationRequest(id=r["id"], continue_final=True, messages=[
                {"role": "user", "content": build_prompt(CRITERIA[r["criterion"]], r["question"], r["shots"])},
                {"role": "assistant", "content": texts[r["id"]] + f"{field} "}],
                sampling=SamplingParams(max_tokens=self.cfg.max_tokens[key], temperature=self.cfg.temperature,
                                        seed=request_seed(self.cfg.seed, f"{r['id']}:{key}"), stop=stop))
                    for r in rows]
            for r, res in zip(rows, self.engine.generate(reqs)):
                value = res.text.strip()
                got[r["id"]][key] = value
                texts[r["id"]] += f"{field} {value}\n"
        out = [{**r, "draft": None, "critique": None, "corrected": None, "fault": False, "kept": False,
                "reason": "the prompt does not fit the model's context even without few-shot examples",
                "model": self.engine.model.name, "engine": self.engine.name} for r in too_long]
        for r in rows:
            g, c = got[r["id"]], CRITERIA[r["criterion"]]
            reason = check(c, g["draft"], g["critique"], g["corrected"], self.cfg.min_chars)
            out.append({**r, **g, "fault": finds_fault(g["critique"]), "kept": reason is None, "reason": reason,
                        "model": self.engine.model.name, "engine": self.engine.name})
        return pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in out], schema=SCHEMA)

    def _fit(self, row: dict) -> bool:
        """Use as many few-shot examples as the context allows (a small model has little); sets row["shots"]."""
        from mote_ray.chat import encode
        from mote_ray.records import GenerationRequest

        room = self.engine.config.max_model_len - sum(self.cfg.max_tokens.values()) - 16  # + field markers
        c = CRITERIA[row["criterion"]]
        for shots in range(len(c.examples), -1, -1):
            prompt = build_prompt(c, row["question"], shots)
            if len(encode(self.engine.tokenizer, GenerationRequest(messages=[{"role": "user", "content": prompt}]))) <= room:
                row["shots"] = shots
                return True
        return False


def run_aligner_data(config: AlignerDataConfig, prompts: list[str], out: str | Path, limit: int | None = None,
                     restart: bool = False) -> dict:
    from mote_ray import fingerprint
    from mote_ray.aligners.criteria import get_criteria
    from mote_ray.inputs import read_prompts

    out = Path(out)
    started = bool(list((out / "data").glob("part-*.parquet"))) or (out / "topic_questions.jsonl").is_file()
    fingerprint.check(out, data_fingerprint(config), has_output=started, restart=restart, what="aligner data",
                      clear=[out / n for n in _OUTPUTS])
    (out / "data").mkdir(parents=True, exist_ok=True)
    criteria = get_criteria(config.criteria)
    rows, rejects = read_prompts(prompts) if prompts else ([], [])
    rows = rows[:limit] if limit else rows
    if config.topics:
        topic_rows, topic_rejects = topic_questions(config, out)
        rows, rejects = rows + topic_rows, rejects + topic_rejects
    done = set(read_data(out).column("id").to_pylist()) if list((out / "data").glob("part-*.parquet")) else set()
    todo = [{"id": f"{r.id}:{c.name}", "prompt_id": r.id, "question": r.question, "criterion": c.name}
            for r in rows for c in criteria if f"{r.id}:{c.name}" not in done]
    print(f"mote-ray: {len(rows)} questions x {len(criteria)} criteria; {len(done)} rows done earlier, "
          f"{len(todo)} to generate", flush=True)
    if todo:
        _generate(config, todo, out)
    table = read_data(out)
    with open(out / "rejects.jsonl", "w") as f:
        for r in rejects:
            f.write(json.dumps({"stage": "input", **r.model_dump()}) + "\n")
        for r in table.filter(pa.compute.invert(table["kept"])).to_pylist():
            f.write(json.dumps({"stage": "cleaning", "id": r["id"], "criterion": r["criterion"], "reason": r["reason"]}) + "\n")
    stats = data_stats(table, len(rejects))
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


# What the job writes into OUT, removed by `restart`.
_OUTPUTS = ("data", "rejects.jsonl", "stats.json", "topic_questions.jsonl")


def data_fingerprint(config: AlignerDataConfig) -> dict:
    """What determines a row: the engine (fingerprint.engine_identity), each criterion's principles
    and examples, budgets, sampling, the cleaning threshold, and the topics questions are written
    from. Not the pool, nor the prompts: rows are keyed by question, so more prompts resume."""
    from mote_ray.aligners.criteria import get_criteria
    from mote_ray.fingerprint import SEEDS, engine_identity

    return {**engine_identity(config.engine), "seeds": SEEDS,
            "criteria": {c.name: dataclasses.asdict(c) for c in get_criteria(config.criteria)},
            **config.model_dump(exclude={"engine", "pool", "criteria"})}


def _generate(config: AlignerDataConfig, todo: list[dict], out: Path) -> None:
    """The rows of `todo` through CritiqueStage actors, each batch written as it comes."""
    import ray

    from mote_ray.cluster import init_ray
    from mote_ray.engine_stage import map_engine
    from mote_ray.generation import write_atomic

    init_ray()
    ds = map_engine(ray.data.from_items(todo), config.engine, config.pool, stage=CritiqueStage,
                    stage_kwargs={"config": config.model_dump()})
    for batch in ds.iter_batches(batch_size=config.pool.batch_size, batch_format="pyarrow"):
        write_atomic(batch.cast(SCHEMA), out / "data")  # a killed job keeps every finished batch


def topic_questions(config: AlignerDataConfig, out: Path) -> tuple[list, list]:
    """Questions the model writes from seed topics (Ray Data over the engine), kept in OUT/topic_questions.jsonl
    so a rerun asks the same questions; returns (rows, rejects) like inputs.read_prompts."""
    import ray

    from mote_ray.cluster import init_ray
    from mote_ray.engine_stage import map_engine
    from mote_ray.inputs import read_prompts
    from mote_ray.records import SamplingParams, request_seed

    cache = out / "topic_questions.jsonl"
    if not cache.is_file():
        init_ray()
        asks = [{"id": f"{t}#{i}", "messages": [{"role": "user", "content": f"Write one question a user might ask "
                                                                         f"an assistant about {t}. Reply with the "
                                                                         f"question only."}]}
                for t in config.topics for i in range(config.questions_per_topic)]
        # Each ask its own seed: one prompt asked N times must not draw one random stream N times.
        ds = ray.data.from_items(asks).map(lambda r: {**r, "sampling": {
            "max_tokens": 48, "temperature": 0.9, "seed": request_seed(config.seed, r["id"]), "stop": ["\n"]}})
        done = map_engine(ds, config.engine, config.pool, sampling=SamplingParams()).take_all()
        cache.write_text("".join(json.dumps({"prompt": r["text"].strip(), "topic": r["id"].split("#")[0]}) + "\n"
                                 for r in done))
    return read_prompts([str(cache)])  # empty or repeated questions become rejects here


def read_data(out: str | Path) -> pa.Table:
    import pyarrow.parquet as pq

    files = sorted((Path(out) / "data").glob("part-*.parquet"))
    if not files:
        from mote_ray.errors import MoteError

        raise MoteError(f"no aligner data in {out}/data; run `mote-ray aligners data` first")
    return pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])


def data_stats(table: pa.Table, input_rejects: int = 0) -> dict:
    rows = table.to_pylist()
    per = {}
    for name in sorted({r["criterion"] for r in rows}):
        mine = [r for r in rows if r["criterion"] == name]
        per[name] = {"rows": len(mine), "kept": sum(r["kept"] for r in mine),
                     "with_fault": sum(r["fault"] for r in mine if r["kept"]),
                     "rejected": dict(Counter(r["reason"] for r in mine if not r["kept"]))}
    return {"rows": len(rows), "kept": sum(r["kept"] for r in rows), "input_rejects": input_rejects,
            "per_criterion": per, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
