"""The AlignCoT generation job: prompts in, one chain row per prompt out, resumable, on Ray Data.

Layout of an output directory:
    chains/part-*.parquet   one row per accepted input (CHAIN_SCHEMA), written atomically per batch
    rejects.jsonl           input rows that failed validation, with the reason
    stats.json              summary in the paper's terms (how many chains needed Analysis, Guidance)
    fingerprint.json        what determines the output (model, engine, templates, sampling, policy)
Rerunning with the same directory skips ids already in chains/, so a killed run resumes with
every input exactly once; a rerun whose fingerprint differs is refused (naming what changed) unless
`restart=True` (`--restart`) discards the old chains first.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mote_ray.config import EngineConfig, PoolConfig
from mote_ray.stages import Templates

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def _list(t: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("element", t))  # Parquet's own item name, so the schema round-trips
CHAIN_SCHEMA = pa.schema([
    ("id", pa.string()),                  # content hash of the normalised dialogue (inputs.prompt_id)
    ("source", pa.string()),              # input file and
    ("row", pa.int64()),                  # 1-based row in it
    ("history", _list(_MESSAGE)),      # dialogue before the question (full, unclipped)
    ("question", pa.string()),
    ("analysis", pa.string()),            # null when the chain did not need it
    ("guidance", pa.string()),            # null when the chain did not need it
    ("answer", pa.string()),              # the last attempt's answer (null only on error)
    ("stages", _list(pa.string())),    # chain stages used, in order, e.g. ["analysis", "answer"]
    ("attempts", _list(pa.struct([     # every answer tried and its self-check, in order
        ("stages", _list(pa.string())), ("answer", pa.string()),
        ("verdict", pa.string()), ("check_text", pa.string())]))),
    ("verdict", pa.string()),             # last self-check: safe | unsafe | unparseable
    ("flagged", pa.bool_()),              # unsafe after all stages, or failed
    ("kept", pa.bool_()),                 # used for training under the policy (see GenerateConfig.policy)
    ("error", pa.string()),               # why generation failed for this row, else null
    ("model", pa.string()),
    ("engine", pa.string()),
    ("prompt_tokens", pa.int64()),        # summed over every engine call for this row
    ("completion_tokens", pa.int64()),
    ("stage_tokens", pa.map_(pa.string(), pa.int64())),  # generated tokens per stage (incl. check)
    ("generation_seconds", pa.float64()), # this row's share of engine time
    ("created_at", pa.timestamp("ms", tz="UTC")),
])


class GenerateConfig(BaseModel):
    """Everything `mote-ray generate` needs; YAML in jobs/configs/generate.yaml."""

    model_config = ConfigDict(extra="forbid")
    engine: EngineConfig = EngineConfig()
    pool: PoolConfig = PoolConfig(batch_size=32)
    templates: Templates = Templates()
    # Defaults fit the offline default model's 512-token context with its templates (~310 tokens of
    # them: a byte-level tokenizer); `check_context` measures this per model at the start of a job.
    max_tokens: dict[str, int] = Field(default_factory=lambda: {"analysis": 32, "guidance": 32, "answer": 64,
                                                                "check": 8})
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = 0
    # Chains still unsafe after all stages: `keep_flagged` keeps them for training with flagged=true;
    # `drop` sets kept=false. Either way the row and its attempts stay in chains/ (nothing is lost).
    policy: Literal["keep_flagged", "drop"] = "keep_flagged"
    question_tokens: int = Field(48, ge=8)  # longer questions are clipped in stage prompts
    history_tokens: int = Field(48, ge=0)   # earlier turns (text + template markers) over this are left out
    # Chains in flight per engine call; None = the whole batch in lockstep. A smaller number lets new
    # prompts start while others are at later stages (one engine call then mixes stages).
    max_active: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _budgets_fit_the_context(self) -> GenerateConfig:
        """A chain at the clipping limits whose stages use their budgets must fit the engine's context,
        else its answer prompt cannot be built and the row ends as an error (chains.py). Checked on
        load so a cluster run does not find out hours in; the templates' own tokens are added at the start
        of the job, when the tokenizer is at hand (`check_context`)."""
        missing = {"analysis", "guidance", "answer", "check"} - set(self.max_tokens)
        if missing:
            raise ValueError(f"max_tokens needs a budget for every stage; missing {sorted(missing)}")
        m, ctx = self.max_tokens, self.engine.max_model_len
        parts = {"history_tokens": self.history_tokens, "question_tokens": self.question_tokens,
                 "max_tokens.analysis": m["analysis"], "max_tokens.guidance": m["guidance"],
                 "max_tokens.answer": m["answer"]}
        need = sum(parts.values())
        if need > ctx:
            terms = " + ".join(f"{k} {v}" for k, v in parts.items())
            raise ValueError(f"stage budgets do not fit engine.max_model_len={ctx}: a full chain needs {terms} = "
                             f"{need} tokens (plus template text). Lower some of these by {need - ctx} in total, "
                             f"or raise engine.max_model_len if the model's context allows")
        return self


def check_context(config: GenerateConfig, tokenizer, model_context: int | None = None) -> dict[str, int]:
    """The longest prompt each stage can get, measured with this model's tokenizer and chat template:
    the templates' own text plus every text it quotes at its budget (the history budget counts each
    turn's template markers too: chains.turn_overhead). Raises,
    naming the numbers, when a stage could not then write its own budget: such a chain would end as an
    error row (chains.py) or with its answer cut short. Returns tokens needed per stage."""
    from mote_ray.chat import encode
    from mote_ray.errors import MoteError
    from mote_ray.records import GenerationRequest
    from mote_ray.stages import Stage

    m, ctx, t = config.max_tokens, config.engine.max_model_len, config.templates
    if model_context and ctx > model_context:
        raise MoteError(f"engine.max_model_len={ctx} is longer than this model's context ({model_context} positions): "
                        f"lower it and the budgets with it (a config sized for a real model, e.g. jobs/configs/"
                        f"generate.yaml, does not fit the offline default; run that without --config)")
    quoted = {"analysis": ["question"], "guidance": ["question", "analysis"],
              "answer": ["history", "question", "analysis", "guidance"], "check": ["question", "answer"]}
    budget = {"history": config.history_tokens, "question": config.question_tokens, **m}
    need, parts = {}, {}
    for stage in Stage:
        x = {k: "x" for k in ("analysis", "guidance", "answer") if k in quoted[stage.value]}
        msgs = t.messages(stage, [], "x", **x)
        template = len(encode(tokenizer, GenerationRequest(messages=msgs)))  # each "x" stands for its budget
        parts[stage.value] = {"template text": template, **{k: budget[k] for k in quoted[stage.value]},
                              f"max_tokens.{stage.value}": m[stage.value]}
        need[stage.value] = sum(parts[stage.value].values())
    over = {s: n for s, n in need.items() if n > ctx}
    if over:
        s = max(over, key=over.get)
        terms = " + ".join(f"{k} {v}" for k, v in parts[s].items())
        raise MoteError(f"the {s} stage's prompt and budget do not fit engine.max_model_len={ctx} with this model's "
                        f"templates: {terms} = {need[s]} tokens. Lower question_tokens, history_tokens or "
                        f"max_tokens by {need[s] - ctx} in total, or raise engine.max_model_len if the model allows")
    return need


class ChainStage:
    """Ray Data stage: one engine per actor; rows of PromptRow in, rows of CHAIN_SCHEMA out."""

    def __init__(self, config: dict):
        from mote_ray.chains import ChainBuilder
        from mote_ray.engines import create_engine
        from mote_ray.records import SamplingParams

        self.config = cfg = GenerateConfig(**config)
        self.engine = create_engine(cfg.engine)
        sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
        self.builder = ChainBuilder(self.engine, cfg.templates, cfg.max_tokens, sampling,
                                    cfg.question_tokens, cfg.history_tokens)
        self.metrics = _Metrics()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        missing = {"id", "question"} - set(batch.column_names)
        if missing:
            raise ValueError(f"chain stage rows need columns {sorted(missing)}")
        states = self.builder.run(rows, self.config.max_active)
        out = [self._row(r, s) for r, s in zip(rows, states)]
        self.metrics.record(states)
        return pa.Table.from_pylist(out, schema=CHAIN_SCHEMA)

    def _row(self, row: dict, s) -> dict:
        flagged = s.flagged
        return {**{k: row.get(k) for k in ("id", "source", "row", "history", "question")},
                "analysis": s.analysis, "guidance": s.guidance, "answer": s.answer, "stages": s.stages_used,
                "attempts": [a.model_dump() for a in s.attempts],
                "verdict": s.attempts[-1].verdict if s.attempts else None, "flagged": flagged,
                "kept": s.error is None and not (flagged and self.config.policy == "drop"), "error": s.error,
                "model": self.engine.model.name, "engine": self.engine.name, "prompt_tokens": s.prompt_tokens,
                "completion_tokens": s.completion_tokens, "stage_tokens": list(s.stage_tokens.items()),
                "generation_seconds": s.seconds, "created_at": int(time.time() * 1000)}


class _Metrics:
    """Ray metrics (Prometheus via the dashboard) for throughput and the stage mix."""

    def __init__(self):
        self.enabled = False
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():
                return
            self.prompts = metrics.Counter("mote_generate_prompts_done", "Prompts with a finished chain")
            self.tokens = metrics.Counter("mote_generate_tokens", "Generated tokens", tag_keys=("stage",))
            self.mix = metrics.Counter("mote_generate_chains", "Chains by stages used and outcome",
                                       tag_keys=("stages", "flagged"))
            self.enabled = True
        except ImportError:
            pass

    def record(self, states) -> None:
        if not self.enabled:
            return
        self.prompts.inc(len(states))
        for s in states:
            for stage, n in s.stage_tokens.items():
                if n:
                    self.tokens.inc(n, tags={"stage": stage})
            self.mix.inc(1, tags={"stages": "+".join(s.stages_used), "flagged": str(s.flagged).lower()})


# ---------------------------------------------------------------- the job

def output_fingerprint(config: GenerateConfig) -> dict:
    """What determines a chain: the model (its files' content), the engine actually chosen ("auto"
    resolves per machine), the templates, sampling and clipping, and the keep policy. Not the pool or
    batch sizes, which change speed but not output."""
    from mote_ray.fingerprint import SEEDS, engine_identity

    return {**engine_identity(config.engine),
            "templates": config.templates.model_dump(),
            "sampling": {"max_tokens": config.max_tokens, "temperature": config.temperature, "top_p": config.top_p,
                         "seed": config.seed, "seeds": SEEDS},
            "policy": config.policy,
            "clipping": {"question_tokens": config.question_tokens, "history_tokens": config.history_tokens}}


def run_generate(config: GenerateConfig, prompts: list[str], out: str | Path, *, fmt: str = "auto",
                 column: str | None = None, limit: int | None = None, address: str | None = None,
                 progress: bool = True, restart: bool = False) -> dict:
    """Read prompts, generate chains for those not yet in `out`, write stats; returns the stats.
    Refuses to resume an `out` made under another fingerprint; `restart` discards it instead."""
    from mote_ray import fingerprint
    from mote_ray.inputs import read_prompts

    from mote_ray.chat import load_tokenizer
    from mote_ray.models import resolve_model

    resolved = resolve_model(config.engine.model, config.engine.gguf_file)
    check_context(config, load_tokenizer(resolved), resolved.hf_config().get("max_position_embeddings"))
    out = Path(out)
    fingerprint.check(out, output_fingerprint(config), has_output=bool(chain_files(out)), restart=restart,
                      what="generated chains",
                      clear=[out / "chains", out / "rejects.jsonl", out / "stats.json"])
    (out / "chains").mkdir(parents=True, exist_ok=True)
    rows, rejects = read_prompts(prompts, fmt, column)  # type: ignore[arg-type]
    if limit is not None:
        rows = rows[:limit]
    with open(out / "rejects.jsonl", "w") as f:
        for r in rejects:
            f.write(r.model_dump_json() + "\n")
    done = done_ids(out)
    pending = [r.model_dump() for r in rows if r.id not in done]
    _log(f"{len(rows)} prompts accepted, {len(rejects)} rejected (see {out / 'rejects.jsonl'}), "
         f"{len(rows) - len(pending)} already done, {len(pending)} to generate")
    if pending:
        _generate(config, pending, out, address, progress, rejects)
    stats = chain_stats(out, n_rejects=len(rejects))
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _generate(config: GenerateConfig, pending: list[dict], out: Path, address: str | None, progress: bool,
              rejects: list = ()) -> None:
    import ray
    from tqdm import tqdm

    from mote_ray.cluster import init_ray
    from mote_ray.engine_stage import map_engine
    from mote_ray.metrics import record_rejects

    init_ray(address)
    record_rejects(rejects)  # now, not at the end: a dashboard sees them while the job runs
    bs = config.pool.batch_size
    ds = ray.data.from_items(pending, override_num_blocks=max(1, -(-len(pending) // bs)))
    ds = map_engine(ds, config.engine, config.pool, stage=ChainStage, stage_kwargs={"config": config.model_dump()})
    bar = tqdm(total=len(pending), desc="chains", unit="prompt", disable=not progress)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        write_atomic(batch, out / "chains")
        bar.update(batch.num_rows)
    bar.close()


def write_atomic(table: pa.Table, folder: Path) -> Path:
    """Write a Parquet part under a temporary name, then rename: a kill leaves no partial file."""
    import pyarrow.parquet as pq

    final = folder / f"part-{int(time.time())}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = folder / f".tmp-{final.name}"
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def write_chains(rows: list[dict], out: Path, source: str = "import") -> Path:
    """Write chains made elsewhere (each: question, answer, optional history/analysis/guidance) as a
    generation output folder that `mote-ray train` reads; ids are content hashes, as for generated rows."""
    from mote_ray.inputs import prompt_id
    from mote_ray.records import Message

    full = []
    for i, r in enumerate(rows):
        stages = [s for s in ("analysis", "guidance", "answer") if r.get(s)]
        history = r.get("history") or []
        full.append({"id": r.get("id") or prompt_id([Message(**m) for m in history], r["question"]), "source": source, "row": i + 1,
                     "history": history, "question": r["question"], "analysis": r.get("analysis"),
                     "guidance": r.get("guidance"), "answer": r["answer"], "stages": stages, "attempts": [],
                     "verdict": "safe", "flagged": False, "kept": True, "error": None, "model": r.get("model", source),
                     "engine": "none", "prompt_tokens": 0, "completion_tokens": 0, "stage_tokens": [],
                     "generation_seconds": 0.0, "created_at": 0})
    (Path(out) / "chains").mkdir(parents=True, exist_ok=True)
    return write_atomic(pa.Table.from_pylist(full, schema=CHAIN_SCHEMA), Path(out) / "chains")


def chain_files(out: Path) -> list[Path]:
    return sorted((Path(out) / "chains").glob("part-*.parquet"))


def done_ids(out: Path) -> set[str]:
    import pyarrow.parquet as pq

    return {i for f in chain_files(out) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()}


def read_chains(out: str | Path) -> pa.Table:
    import pyarrow.parquet as pq

    files = chain_files(Path(out))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else CHAIN_SCHEMA.empty_table()


def chain_stats(out: Path, n_rejects: int = 0) -> dict:
    """Summary in the paper's terms (paper: 71.5% of chains with Analysis, 61.4% with Guidance)."""
    t = read_chains(out).select(["stages", "flagged", "error", "kept", "attempts", "completion_tokens",
                                 "generation_seconds"]).to_pylist()
    n = len(t)
    with_analysis = sum("analysis" in r["stages"] for r in t)
    with_guidance = sum("guidance" in r["stages"] for r in t)
    verdicts = [a["verdict"] for r in t for a in r["attempts"]]
    pct = (lambda k: round(100 * k / n, 2) if n else 0.0)
    return {
        "total": n, "with_analysis": with_analysis, "with_guidance": with_guidance,
        "direct_safe": sum(r["stages"] == ["answer"] and not r["flagged"] for r in t),
        "unsafe_after_all": sum(r["flagged"] and r["error"] is None for r in t),
        "errors": sum(r["error"] is not None for r in t), "kept": sum(r["kept"] for r in t),
        "rejects": n_rejects,
        "pct_with_analysis": pct(with_analysis), "pct_with_guidance": pct(with_guidance),
        "self_checks": len(verdicts), "unparseable_verdicts": verdicts.count("unparseable"),
        "completion_tokens": sum(r["completion_tokens"] for r in t),
        "engine_seconds": round(sum(r["generation_seconds"] for r in t), 3),
    }


def _log(msg: str) -> None:
    import sys

    print(f"mote-ray: {msg}", file=sys.stderr)
