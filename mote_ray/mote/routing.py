"""Which expert each token uses, and which spans may attend to which (step skipping).

Stage ids per token come from the special tokens: a span runs from its start token to its end
token inclusive (so at inference the expert switches as soon as a start token is emitted, and a
stage's own end token is still its expert's). Tokens outside spans (history, question, padding)
have stage id -1 and go to a stage expert chosen per sample: at random (seeded) in training, as
in the paper, or a fixed one (config `prompt_expert`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from mote_ray.stages import CHAIN_STAGES, STAGE_TOKENS

EXPERTS = tuple(s.value for s in CHAIN_STAGES)  # expert index = position here; shared = len(EXPERTS)
NO_STAGE = -1


def stage_token_ids(tokenizer) -> dict[str, tuple[int, int]]:
    """{stage: (start id, end id)} for a tokenizer that has the stage tokens added."""
    ids = {}
    for stage, (start, end) in STAGE_TOKENS.items():
        s, e = tokenizer.convert_tokens_to_ids(start), tokenizer.convert_tokens_to_ids(end)
        if s in (None, tokenizer.unk_token_id) or e in (None, tokenizer.unk_token_id):
            raise ValueError(f"tokenizer lacks the stage tokens {start}/{end}; call mote.model.add_stage_tokens")
        ids[stage.value] = (s, e)
    return ids


def stage_ids(input_ids: Sequence[int], token_ids: dict[str, tuple[int, int]]) -> list[int]:
    """Per token: index into EXPERTS of the span it lies in, or NO_STAGE."""
    start_of = {s: EXPERTS.index(stage) for stage, (s, _) in token_ids.items()}
    end_of = {e: EXPERTS.index(stage) for stage, (_, e) in token_ids.items()}
    out, current = [], NO_STAGE
    for tok in input_ids:
        if tok in start_of:
            current = start_of[tok]
        out.append(current)
        if tok in end_of:
            current = NO_STAGE
    return out


def expert_index(stages: torch.Tensor, prompt_expert: str = "random",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, seq) stage ids -> (batch, seq) expert index; NO_STAGE tokens get the prompt expert."""
    if prompt_expert == "random":
        fill = torch.randint(len(EXPERTS), (stages.shape[0], 1), generator=generator).to(stages.device)
    else:
        fill = torch.full((stages.shape[0], 1), EXPERTS.index(prompt_expert), device=stages.device)
    return torch.where(stages == NO_STAGE, fill.expand_as(stages), stages)


def skip_plan(stages: torch.Tensor, attention_mask: torch.Tensor, p_skip: float,
              generator: torch.Generator | None = None,
              drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step skipping: (batch, 1, seq, seq) boolean attention mask (True = may attend, what sdpa takes)
    and (batch, seq) position ids.

    Per sample, each stage followed by a later stage is dropped with probability `p_skip` (or as
    given by `drop`, (batch, n_stages) bool). A dropped stage is hidden from *every* later span of
    that sample, so the later spans see exactly the chain written without it; the dropped span
    itself still trains (it sees the question as usual).
    Position ids close the gap: a token after a dropped span takes the position it has in the
    shortened chain (its position minus the hidden tokens before it). Rotary attention depends on
    relative positions, so this makes the masked full chain compute what the shortened chain
    computes, not a chain with a hole in it (tests/test_mote_layer.py checks the equivalence).
    """
    b, t = stages.shape
    causal = torch.ones(t, t, dtype=torch.bool, device=stages.device).tril()
    mask = causal[None] & attention_mask.bool()[:, None, :]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    n = len(EXPERTS)
    if drop is None and p_skip <= 0:
        return mask[:, None], positions
    in_span = stages != NO_STAGE
    onehot = torch.nn.functional.one_hot(stages.clamp(min=0), n).bool() & in_span[..., None]  # (b, t, n)
    present = onehot.any(dim=1)  # (b, n)
    has_later = present.flip(-1).cumsum(-1).flip(-1) > present.long()  # a later stage follows
    if drop is None:
        drop = torch.rand(b, n, generator=generator).to(stages.device) < p_skip
    drop = drop.to(stages.device).bool() & present & has_later
    key_dropped = drop.gather(1, stages.clamp(min=0)) & in_span  # (b, t): key lies in a dropped span
    later = stages[:, :, None] > stages[:, None, :]  # query's stage after key's (NO_STAGE is never after)
    hidden = later & key_dropped[:, None, :] & in_span[:, :, None]
    mask = mask & ~hidden
    positions = positions - hidden.sum(-1)
    return mask[:, None], positions


def skip_mask(stages: torch.Tensor, attention_mask: torch.Tensor, p_skip: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The attention mask of `skip_plan` alone (position ids left as they are)."""
    return skip_plan(stages, attention_mask, p_skip, generator)[0]
