"""Next-token NLL over stage spans only (not history/question), overall and per stage."""

from __future__ import annotations

import torch

from mote_ray.mote.routing import EXPERTS, NO_STAGE


def stage_nll(logits: torch.Tensor, input_ids: torch.Tensor, stages: torch.Tensor):
    """logits (b, t, V), input_ids (b, t), stages (b, t) -> (mean loss, {stage: (sum, count)}).

    The target at t+1 counts when token t+1 lies in a stage span (its start token included: the
    model learns to choose its first stage).
    """
    target, target_stage = input_ids[:, 1:], stages[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, reduction="none")
    mask = target_stage != NO_STAGE
    count = mask.sum()
    loss = (nll * mask).sum() / count.clamp(min=1)
    per_stage = {name: ((nll * (target_stage == i)).sum().detach(), (target_stage == i).sum())
                 for i, name in enumerate(EXPERTS)}
    return loss, per_stage
