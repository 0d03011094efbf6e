"""The recipe's pieces, each testable without Ray: schedule, accumulation, clipping, validation."""

from __future__ import annotations

import math

import torch

from mote_ray.mote.routing import EXPERTS, expert_index, skip_plan
from mote_ray.training.data import collate
from mote_ray.training.losses import stage_nll


def make_scheduler(opt, schedule: str, total_steps: int, warmup_ratio: float):
    """transformers' warm-up + cosine / linear / constant schedule (a LambdaLR, so it checkpoints)."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[schedule]
    return get_scheduler(name, opt, num_warmup_steps=math.ceil(warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def supervised_tokens(batch: dict) -> int:
    """Targets that count in the loss: tokens 1.. inside a stage span."""
    return int((batch["stages"][:, 1:] >= 0).sum())


def accumulate(model, micro: list[list[dict]], pad_id: int, mote_cfg, p_skip: float, gen: torch.Generator,
               device: str, sync=None) -> dict:
    """Forward + backward over `micro` micro-batches as one batch: each micro-batch's summed loss
    is divided by the supervised tokens of all of them, so N micro-batches of b give the gradient
    of one batch of N·b. `sync(last)` turns FSDP2's gradient reduction off until the last one.
    Returns {"loss_sum", "count", "tokens", stage: (sum, count)}."""
    batches = [collate(mb, pad_id) for mb in micro]
    denom = max(sum(supervised_tokens(b) for b in batches), 1)
    out = {"loss_sum": 0.0, "count": 0, "tokens": 0, **{s: [0.0, 0] for s in EXPERTS}}
    for i, batch in enumerate(batches):
        if sync is not None:
            sync(i == len(batches) - 1)
        ids, stages = batch["input_ids"].to(device), batch["stages"].to(device)
        experts = expert_index(stages, mote_cfg.prompt_expert, gen).to(device)
        mask, pos = skip_plan(stages, batch["attention_mask"].to(device), p_skip, gen)
        logits = model(ids, experts, attention_mask=mask, position_ids=pos).logits
        loss, per_stage = stage_nll(logits, ids, stages)
        n = supervised_tokens(batch)
        (loss * n / denom).backward()
        out["loss_sum"] += float(loss.detach()) * n
        out["count"] += n
        out["tokens"] += int(batch["attention_mask"].sum())
        for s, (v, c) in per_stage.items():
            out[s][0] += float(v)
            out[s][1] += int(c)
    return out


def clip(params: list, max_norm: float | None) -> float:
    """Clip to `max_norm` (None: measure only); returns the total norm before clipping (all ranks)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2 DTensor grads
        norm = norm.full_tensor()
    return float(norm)


@torch.no_grad()
def validate(model, examples: list[dict], n_batches: int, batch_size: int, pad_id: int, mote_cfg,
             device: str, filler: list[dict]) -> torch.Tensor:
    """Per-stage summed NLL and counts over this rank's validation examples, as a flat tensor
    [sum_0, count_0, sum_1, ...]. Every rank runs `n_batches` forwards (FSDP collectives need the
    same number everywhere); a rank with fewer runs `filler` batches that count for nothing."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(2 * len(EXPERTS), dtype=torch.float64)
    for i in range(n_batches):
        chunk = examples[i * batch_size:(i + 1) * batch_size]
        batch = collate(chunk or filler, pad_id)
        ids, stages = batch["input_ids"].to(device), batch["stages"].to(device)
        experts = expert_index(stages, mote_cfg.inference_prompt_expert).to(device)
        mask, pos = skip_plan(stages, batch["attention_mask"].to(device), 0.0)
        _, per_stage = stage_nll(model(ids, experts, attention_mask=mask, position_ids=pos).logits, ids, stages)
        if chunk:
            for k, s in enumerate(EXPERTS):
                stats[2 * k] += float(per_stage[s][0])
                stats[2 * k + 1] += float(per_stage[s][1])
    model.train(was_training)
    return stats


def val_metrics(stats: torch.Tensor) -> dict:
    """{"val_loss", "val_loss_<stage>"} from summed [sum, count] pairs (stages without tokens left out)."""
    out, total, count = {}, 0.0, 0.0
    for k, s in enumerate(EXPERTS):
        v, c = float(stats[2 * k]), float(stats[2 * k + 1])
        if c:
            out[f"val_loss_{s}"] = v / c
            total, count = total + v, count + c
    if count:
        out["val_loss"] = total / count
    return out
