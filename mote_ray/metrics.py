"""Ray metrics (ray.util.metrics -> each node's Prometheus endpoint) for training, evaluation and
generation rejects. generation.py (prompts, tokens, stage mix) and the serving Router define their
own next to the code that counts.

Ray exports a metric declared as `mote_x` as `ray_mote_x` (counters as `ray_mote_x_total`); the
dashboard (deploy/grafana/mote-ray.json) and `mote-ray top` query those names.
Objects are created on first use, only inside a Ray process: without Ray, recording is a no-op,
and `import mote_ray` never imports Ray for them.
"""

from __future__ import annotations

from collections import Counter as _Tally
from typing import Any

_made: dict[str, Any] = {}


def _metric(kind: str, name: str, description: str, **kwargs) -> Any:
    import ray

    if not ray.is_initialized():
        return None
    if name not in _made:
        from ray.util import metrics

        _made[name] = getattr(metrics, kind)(name, description, **kwargs)
    return _made[name]


def record_rejects(rejects: list) -> None:
    """Input rows the generation job rejected, by reason (the text before any ':' detail)."""
    if not rejects or not (c := _metric("Counter", "mote_generate_rejects", "Rejected input rows", tag_keys=("reason",))):
        return
    for reason, n in _Tally(r.reason.split(":")[0][:48] for r in rejects).items():
        c.inc(n, tags={"reason": reason})


def record_train_step(metrics: dict, tokens: float, seconds: float) -> None:
    """One optimizer step on rank 0: tokens of all ranks, the step's wall time, loss overall and per stage."""
    if not (tok := _metric("Counter", "mote_train_tokens", "Tokens trained (all workers)")):
        return
    tok.inc(tokens)
    _metric("Histogram", "mote_train_step_seconds", "Time per optimizer step",
            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]).observe(seconds)
    loss = _metric("Gauge", "mote_train_loss", "Training loss, overall (stage=all) and per stage",
                   tag_keys=("stage",))
    loss.set(metrics["loss"], tags={"stage": "all"})
    for key, value in metrics.items():
        if key.startswith("loss_"):
            loss.set(value, tags={"stage": key[len("loss_"):]})


def record_eval_planned(rows: list[dict]) -> None:
    """Prompts an evaluation is about to answer, by suite (the progress denominator)."""
    if rows and (c := _metric("Counter", "mote_eval_prompts_planned", "Evaluation prompts to answer",
                              tag_keys=("suite",))):
        for suite, n in _Tally(r.get("suite", "") for r in rows).items():
            c.inc(n, tags={"suite": suite})


def record_eval_answered(rows: list[dict]) -> None:
    """Answered evaluation prompts, by suite and status (ok | error: kept with its reason)."""
    if rows and (c := _metric("Counter", "mote_eval_prompts_answered", "Evaluation prompts answered",
                              tag_keys=("suite", "status"))):
        for (suite, status), n in _Tally((r.get("suite", ""), "error" if r.get("error") else "ok")
                                         for r in rows).items():
            c.inc(n, tags={"suite": suite, "status": status})
