"""Ray Data stage that holds one engine per actor: rows with a prompt in, rows with text out.

Input rows need `id` and either `prompt` (raw text) or `messages` (list of {role, content});
optional `sampling` (dict of SamplingParams fields) and `adapter`. Output rows keep every input
column and add the GenerationResult fields (text, token_ids, prompt_tokens, completion_tokens,
finish_reason, engine, model).
"""

from __future__ import annotations

import time
from typing import Any

from mote_ray.config import EngineConfig, PoolConfig
from mote_ray.errors import MoteError
from mote_ray.records import GenerationRequest, SamplingParams

RESULT_COLUMNS = ("text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason", "engine", "model")


class EngineStage:
    def __init__(self, engine_config: dict, adapters: dict[str, str] | None = None,
                 sampling: dict | None = None):
        from mote_ray.engines import create_engine

        t0 = time.perf_counter()
        self.engine = create_engine(EngineConfig(**engine_config))
        for name, path in (adapters or {}).items():
            self.engine.load_adapter(name, path)
        self.default_sampling = SamplingParams(**(sampling or {}))
        self.init_seconds = time.perf_counter() - t0

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist() if isinstance(batch, pa.Table) else _rows_from_columns(batch)
        requests = [self._request(r) for r in rows]
        results = self.engine.generate(requests)
        for row, res in zip(rows, results):
            row.update({k: getattr(res, k) for k in RESULT_COLUMNS})
        return pa.Table.from_pylist(rows)

    def _request(self, row: dict[str, Any]) -> GenerationRequest:
        if "id" not in row or ("prompt" not in row and "messages" not in row):
            raise MoteError(f"engine stage rows need `id` and `prompt` or `messages`; got columns {sorted(row)}")
        sampling = row.get("sampling")
        return GenerationRequest(
            id=str(row["id"]),
            prompt=row.get("prompt") if row.get("messages") is None else None,
            messages=row.get("messages"),
            sampling=SamplingParams(**sampling) if sampling else self.default_sampling,
            adapter=row.get("adapter"),
        )


def _rows_from_columns(batch: dict) -> list[dict]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _plain(batch[k][i]) for k in keys} for i in range(n)]


def _plain(v):
    return v.tolist() if hasattr(v, "tolist") else v


def map_engine(ds, engine_config: EngineConfig, pool: PoolConfig = PoolConfig(), *,
               adapters: dict[str, str] | None = None, sampling: SamplingParams | None = None,
               stage=None, stage_kwargs: dict | None = None):
    """`ds.map_batches(stage, ...)` with an actor pool sized from the cluster (see cluster.plan_pool).

    `stage` defaults to EngineStage; another stage class (e.g. generation.ChainStage) that builds its
    engine from `stage_kwargs` gets the same pool sizing; its engine config gets the planned threads.
    """
    import ray

    from mote_ray.cluster import plan_pool

    resources = ray.available_resources() or ray.cluster_resources()
    # The driver may sit on a CPU head node: decide by the cluster's GPUs, not the local torch.
    use_gpu = bool(pool.num_gpus) or engine_config.device == "cuda" or (
        engine_config.device == "auto" and resources.get("GPU", 0) >= 1)
    plan = plan_pool(pool, resources, use_gpu=use_gpu)
    cfg = engine_config.model_copy(update={"threads": engine_config.threads or plan.threads})
    if stage is None:
        stage, kwargs = EngineStage, dict(engine_config=cfg.model_dump(), adapters=adapters,
                                          sampling=(sampling or SamplingParams()).model_dump())
    else:
        kwargs = dict(stage_kwargs or {})
        if "config" in kwargs:  # a job config holding an `engine` section
            kwargs["config"] = {**kwargs["config"], "engine": cfg.model_dump()}
        if "engine_config" in kwargs:  # a wrapper of EngineStage
            kwargs["engine_config"] = cfg.model_dump()
    return ds.map_batches(
        stage,
        fn_constructor_kwargs=kwargs,
        batch_size=pool.batch_size, batch_format="pyarrow",
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus or None,
        compute=ray.data.ActorPoolStrategy(size=plan.size),
    )
