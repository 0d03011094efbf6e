"""Who answers the evaluation prompts: a model on the engine layer, a trained MoTE model in one of its
inference modes (the exact token-routed generator), or any OpenAI-compatible endpoint. Each is a
Ray Data stage, so the answers fan out over the cluster like the generation job's.

Model specs on the command line: `PATH_OR_HUB_ID`, `default` (the offline default), `MOTE_DIR@mode`
(adaptive | direct | analysis | full), optionally labelled `label=SPEC`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa

from mote_ray.errors import MoteError
from mote_ray.metrics import record_eval_answered, record_eval_planned

MODES = ("adaptive", "direct", "analysis", "full")


@dataclass(frozen=True)
class ModelSpec:
    label: str
    kind: str  # "engine" | "mote" | "adapter" (a one-LoRA baseline from `mote-ray train`) | "endpoint"
    target: str | None  # model path/id, MoTE dir, or base URL
    mode: str | None = None
    engine: str = "auto"
    served_model: str | None = None  # endpoint: the model name to ask for (default: its first)

    @classmethod
    def parse(cls, spec: str, engine: str = "auto") -> ModelSpec:
        label, _, rest = spec.rpartition("=") if "=" in spec and "://" not in spec.split("=", 1)[0] else ("", "", spec)
        if rest.startswith(("http://", "https://")):
            return cls(label or rest, "endpoint", rest.rstrip("/"))
        path, _, mode = rest.partition("@")
        if mode and mode not in MODES:
            raise MoteError(f"{spec}: mode must be one of {', '.join(MODES)}")
        if is_mote_dir(path) and train_method(path) != "mote":  # sft / lora-chain: base + adapters/default
            if mode:
                raise MoteError(f"{spec}: {path} is a one-LoRA `{train_method(path)}` baseline; it has no modes")
            return cls(label or Path(path).name, "adapter", path, engine=engine)
        if is_mote_dir(path):
            mode = mode or "adaptive"
            return cls(label or f"{Path(path).name}@{mode}", "mote", path, mode, engine=engine)
        if mode:
            raise MoteError(f"{spec}: @mode applies to a `mote-ray train` output, and {path} is not one")
        target = None if path in ("", "default") else path
        return cls(label or (Path(path).name if target else "default"), "engine", target, engine=engine)


def is_mote_dir(path: str) -> bool:
    return bool(path) and (Path(path) / "mote").is_dir() and (Path(path) / "base").is_dir()


def train_method(path: str) -> str:
    import json

    metrics = Path(path) / "train_metrics.json"
    return json.loads(metrics.read_text()).get("method", "mote") if metrics.is_file() else "mote"


class EvalEngineStage:
    """EngineStage that answers what fits: a prompt longer than the engine's context is kept as an
    error row with its reason (jailbreak templates can be long) instead of failing the batch."""

    def __init__(self, **kwargs):
        from mote_ray.engine_stage import EngineStage

        self.stage = EngineStage(**kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from mote_ray.chat import encode
        from mote_ray.records import GenerationRequest

        engine = self.stage.engine
        limit = engine.config.max_model_len
        rows, fits = batch.to_pylist(), []
        for r in rows:
            n = len(encode(engine.tokenizer, GenerationRequest(messages=r["messages"])))
            if n >= limit:
                r.update(text=None, error=f"prompt has {n} tokens; the engine's context is {limit}",
                         completion_tokens=None, engine=engine.name)
            else:
                fits.append(r)
        if fits:
            done = {r["id"]: r for r in self.stage(pa.Table.from_pylist(fits)).to_pylist()}
            rows = [done.get(r["id"], r) for r in rows]
        record_eval_answered(rows)
        return pa.Table.from_pylist([{**r, "error": r.get("error")} for r in rows])


class MoTEResponder:
    """Ray Data actor: answers with the trained MoTE model, every row of a batch at once, each in its
    row's `mode` (or the actor's) — on the vLLM MoTE engine where vLLM can load it, else the batched
    transformers reference."""

    def __init__(self, model_dir: str, mode: str | None, limits: dict, engine: str = "auto",
                 threads: int | None = None):
        import torch

        from mote_ray.mote.offline import OfflineMoTE

        if threads:
            torch.set_num_threads(threads)
        self.mote, self.mode, self.limits = OfflineMoTE(model_dir, engine), mode, limits

    def __call__(self, batch: pa.Table) -> pa.Table:
        from mote_ray.mote.chain import DEFAULT_LIMITS, FORCED

        rows, todo = batch.to_pylist(), []
        limits = {**DEFAULT_LIMITS, **self.limits}  # the chain's budgets for the stages a mode can reach
        for r in rows:
            mode = r.get("mode") or self.mode
            stages = FORCED.get(mode, list(limits))
            room = (self.mote.spec.max_len or 1 << 30) - sum(limits[s] for s in stages) - 2 * len(stages)
            ids = self.mote.encode_chat(r["prompt"])
            if len(ids) > room:
                r.update(response=None, stages=[], completion_tokens=None, seconds=0.0,
                         error=f"prompt has {len(ids)} tokens; this model has room for {room} with its stage limits")
            else:
                todo.append((r, ids, mode))
        for mode in dict.fromkeys(m for *_, m in todo):  # one batch per mode, so each mode's time is its own
            mine = [(r, ids) for r, ids, m in todo if m == mode]
            t0 = time.perf_counter()
            outs = self.mote.generate_many([ids for _, ids in mine], mode=mode, limits=self.limits)
            seconds = (time.perf_counter() - t0) / len(mine)  # the batch's wall time, shared
            for (r, _), out in zip(mine, outs, strict=True):
                r.update(response=out.answer, stages=list(out.stages), completion_tokens=len(out.token_ids),
                         seconds=seconds, error=None, engine=self.mote.name)
        record_eval_answered(rows)
        return pa.Table.from_pylist([{"engine": self.mote.name, **r} for r in rows])


class EndpointResponder:
    """Ray Data actor: asks an OpenAI-compatible endpoint, a few requests in flight."""

    def __init__(self, url: str, model: str | None, max_tokens: int, api_key: str | None, mote_mode: str | None):
        from openai import OpenAI

        self.client = OpenAI(base_url=url if url.endswith("/v1") else url + "/v1", api_key=api_key or "none",
                             max_retries=2, timeout=300)
        self.model = model or self.client.models.list().data[0].id
        self.max_tokens, self.extra = max_tokens, {"mote": {"mode": mote_mode}} if mote_mode else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from concurrent.futures import ThreadPoolExecutor

        def one(r):
            t0 = time.perf_counter()
            try:
                c = self.client.chat.completions.create(model=self.model, max_tokens=self.max_tokens, temperature=0,
                                                        messages=[{"role": "user", "content": r["prompt"]}],
                                                        extra_body=self.extra)
                r.update(response=c.choices[0].message.content or "", error=None,
                         completion_tokens=c.usage.completion_tokens if c.usage else None)
            except Exception as e:  # kept with its reason; scored as missing, never as a refusal
                r.update(response=None, error=f"{type(e).__name__}: {str(e)[:200]}", completion_tokens=None)
            r.update(stages=[], seconds=time.perf_counter() - t0)
            return r

        with ThreadPoolExecutor(8) as pool:
            rows = list(pool.map(one, batch.to_pylist()))
        record_eval_answered(rows)
        return pa.Table.from_pylist(rows)


def answer_groups(specs: list[ModelSpec]) -> list[list[ModelSpec]]:
    """Specs that one engine can answer together: the modes of one trained MoTE model (the mode is
    per chain, so `@adaptive` and `@direct` share an engine start); every other spec on its own."""
    groups: dict = {}
    for s in specs:
        key = ("mote", s.target, s.engine) if s.kind == "mote" else ("one", s.label)
        groups.setdefault(key, []).append(s)
    return list(groups.values())


def respond_group(group: list[ModelSpec], rows: list[list[dict]], **kw) -> list[list[dict]]:
    """`respond` for one group of `answer_groups`: the rows of each spec -> their answers, per spec."""
    if len(group) == 1:
        return [respond(group[0], rows[0], **kw)]
    tagged = [{**r, "id": f"{i}|{r['id']}", "mode": s.mode} for i, (s, mine) in enumerate(zip(group, rows))
              for r in mine]
    answers: list[list[dict]] = [[] for _ in group]
    for r in respond(replace(group[0], mode=None), tagged, **kw):
        i, _, r["id"] = r["id"].partition("|")
        r.pop("mode", None)
        answers[int(i)].append(r)
    return answers


def respond(spec: ModelSpec, rows: list[dict], *, max_tokens: int = 128, limits: dict | None = None,
            api_key: str | None = None) -> list[dict]:
    """rows {id, prompt, ...} -> the same rows with response, completion_tokens, stages (Ray Data job)."""
    import ray

    from mote_ray.cluster import init_ray
    from mote_ray.config import EngineConfig, PoolConfig
    from mote_ray.engine_stage import map_engine
    from mote_ray.records import SamplingParams

    init_ray()
    record_eval_planned(rows)
    ds = ray.data.from_items(rows)
    pool = PoolConfig(batch_size=16)
    if spec.kind in ("engine", "adapter"):
        adapter = None
        cfg = EngineConfig(model=spec.target, engine=spec.engine)
        if spec.kind == "adapter":
            import json

            from mote_ray.mote.fast import vllm_rank

            adapter = {"default": str(Path(spec.target) / "adapters" / "default")}
            rank = json.loads((Path(adapter["default"]) / "adapter_config.json").read_text())["r"]
            cfg = EngineConfig(model=str(Path(spec.target) / "base"), engine=spec.engine, enable_lora=True,
                               max_lora_rank=vllm_rank(rank), max_loras=1)
        use = "default" if adapter else None
        ds = ds.map(lambda r: {**r, "messages": [{"role": "user", "content": r["prompt"]}], "adapter": use})
        out = map_engine(ds, cfg, pool, stage=EvalEngineStage, stage_kwargs=dict(
            engine_config=cfg.model_dump(), adapters=adapter,
            sampling=SamplingParams(max_tokens=max_tokens).model_dump())).take_all()
        for r in out:
            r.update(response=r.pop("text"), stages=[])
            r.pop("messages", None)
            r.pop("adapter", None)
    elif spec.kind == "mote":
        out = map_engine(ds, EngineConfig(), PoolConfig(batch_size=64), stage=MoTEResponder, stage_kwargs=dict(
            model_dir=str(spec.target), mode=spec.mode, limits=limits or {"answer": max_tokens},
            engine=spec.engine)).take_all()
    else:
        out = ds.map_batches(EndpointResponder, fn_constructor_kwargs=dict(
            url=spec.target, model=spec.served_model, max_tokens=max_tokens, api_key=api_key, mote_mode=spec.mode),
            batch_size=16, batch_format="pyarrow", num_cpus=0.1,
            compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    order = {r["id"]: i for i, r in enumerate(rows)}
    return sorted(out, key=lambda r: order[r["id"]])
