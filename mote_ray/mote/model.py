"""MoTEModel: a frozen causal LM with MoTELinear on its target layers and trainable stage-token rows."""

from __future__ import annotations

import math
import zlib
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mote_ray.mote.layer import MoTELinear, RoutingState
from mote_ray.mote.routing import EXPERTS
from mote_ray.stages import SPECIAL_TOKENS

ExpertName = Literal["random", "analysis", "guidance", "answer"]


class MoTEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    r: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)  # stage expert weight; the shared expert gets 1 - alpha
    n_experts: int = Field(len(EXPERTS), ge=0)  # 0 = a plain LoRA (the baselines)
    target_modules: tuple[str, ...] | None = None  # None = every nn.Linear inside the decoder layers
    p_skip: float = Field(0.2, ge=0, le=1)
    # Expert for tokens outside stage spans. Training: random per sample, as in the paper. At
    # inference the prompt is encoded (and the first stage token emitted) by `inference_prompt_expert`;
    # since training saw every expert there, any fixed choice is in distribution.
    prompt_expert: ExpertName = "random"
    inference_prompt_expert: Literal["analysis", "guidance", "answer"] = "answer"


def add_stage_tokens(lm, tokenizer, mean_resizing: bool = False) -> int:
    """Add the six stage tokens (if missing) and resize embeddings; returns the first new id.

    The resized rows of the frozen matrices are never read (the stage-token rows live in
    `new_rows`, initialised by `init_trainable`), so the meta-device build skips mean resizing.
    """
    first_new = len(tokenizer)
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if lm.get_input_embeddings().num_embeddings < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=mean_resizing)
    return min(tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) + [first_new])


class NewRowsEmbedding(nn.Module):
    """Frozen embedding whose rows from `first_new` on (the stage tokens) are a trainable parameter."""

    def __init__(self, emb: nn.Embedding, first_new: int):
        super().__init__()
        self.emb, self.first_new = emb, first_new
        emb.weight.requires_grad_(False)
        # fp32 master rows whatever the base dtype (set by init_trainable)
        self.new_rows = nn.Parameter(emb.weight[first_new:].detach().clone().float())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = (ids >= self.first_new)[..., None]
        base = self.emb(ids)
        new = nn.functional.embedding((ids - self.first_new).clamp(min=0), self.new_rows).to(base.dtype)
        return torch.where(is_new, new, base)


class NewRowsHead(nn.Module):
    """Frozen LM head whose output rows for the stage tokens are trainable (shared if embeddings are tied)."""

    def __init__(self, head: nn.Linear, first_new: int, tied: NewRowsEmbedding | None = None):
        super().__init__()
        self.head, self.first_new = head, first_new
        head.weight.requires_grad_(False)
        self.new_rows = (tied.new_rows if tied is not None
                         else nn.Parameter(head.weight[first_new:].detach().clone().float()))

    @property
    def weight(self):  # transformers reads lm_head.weight in a few places
        return self.head.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)
        new = nn.functional.linear(h, self.new_rows.to(h.dtype)).to(logits.dtype)
        return torch.cat([logits[..., :self.first_new], new], dim=-1)


class MoTEModel(nn.Module):
    def __init__(self, lm, config: MoTEConfig, first_new: int):
        super().__init__()
        self.lm, self.config, self.first_new = lm, config, first_new
        self.routing = RoutingState()
        for p in lm.parameters():
            p.requires_grad_(False)
        self.layer_names = self._wrap_linears()
        emb = NewRowsEmbedding(lm.get_input_embeddings(), first_new)
        lm.set_input_embeddings(emb)
        tied = bool(getattr(lm.config, "tie_word_embeddings", False))
        lm.set_output_embeddings(NewRowsHead(lm.get_output_embeddings(), first_new, emb if tied else None))

    def _wrap_linears(self) -> list[str]:
        c, names = self.config, []
        decoder = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else self.lm
        for name, module in list(decoder.named_modules()):
            for child_name, child in list(module.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                if c.target_modules is not None and child_name not in c.target_modules:
                    continue
                setattr(module, child_name, MoTELinear(child, c.n_experts, c.r, c.lora_alpha, c.alpha, self.routing))
                names.append(f"{name}.{child_name}" if name else child_name)
        if not names:
            raise ValueError(f"no linear layer matched target_modules={c.target_modules}")
        return names

    def forward(self, input_ids, expert_idx, attention_mask=None, **kwargs):
        """`expert_idx`: (batch, seq) expert per token; `attention_mask` 2D padding or 4D boolean (sdpa)."""
        self.routing.set(expert_idx)
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def mote_layers(self):
        return [m for m in self.modules() if isinstance(m, MoTELinear)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.named_parameters() if v.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Strict: every trainable tensor present, nothing else, shapes equal."""
        params = dict(self.named_parameters())
        trainable = {k for k, v in params.items() if v.requires_grad}
        missing, unexpected = sorted(trainable - set(state)), sorted(set(state) - trainable)
        if missing or unexpected:
            raise ValueError(f"MoTE state mismatch: missing {missing[:2]} ({len(missing)}), "
                             f"unexpected {unexpected[:2]} ({len(unexpected)})")
        with torch.no_grad():
            for k, v in state.items():
                if params[k].shape != v.shape:
                    raise ValueError(f"MoTE state: {k} has shape {tuple(v.shape)}, the model {tuple(params[k].shape)}")
                params[k].copy_(v)

    def trainable_init(self, seed: int, row_means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full initial value of every trainable tensor, the same on every rank and build path.

        LoRA A: PEFT's kaiming-uniform (U(±1/sqrt(d_in))) from a generator seeded per layer; B: 0.
        Stage-token rows: the mean of the base's existing rows (`row_means`, "emb" and "head"),
        which is what transformers' mean resizing gives up to its 1e-9-scaled noise.
        """
        return dict(self.iter_trainable_init(seed, row_means))

    def iter_trainable_init(self, seed: int, row_means: dict[str, torch.Tensor]):
        """(name, full initial value) one tensor at a time (a sharded build keeps only its slice)."""
        head_rows = self.lm.get_output_embeddings().new_rows if "head" in row_means else None
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith("lora_A"):
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                bound = 1.0 / math.sqrt(p.shape[-1])
                yield name, (torch.rand(tuple(p.shape), generator=g) * 2 - 1) * bound
            elif name.endswith("lora_B"):
                yield name, torch.zeros(tuple(p.shape))
            elif name.endswith("new_rows"):
                key = "head" if head_rows is not None and p is head_rows else "emb"
                yield name, row_means[key].float()[None].expand(tuple(p.shape)).clone()
            else:
                raise ValueError(f"no initialiser for trainable tensor {name}")

    def base_param_name(self, name: str) -> str:
        """The name a parameter has in the base checkpoint (wrapper levels removed)."""
        parts, node, out = name.split("."), self, []
        for part in parts:
            child = getattr(node, part)
            if not (isinstance(node, MoTELinear) and part == "base") and \
                    not (isinstance(node, NewRowsEmbedding) and part == "emb") and \
                    not (isinstance(node, NewRowsHead) and part == "head") and node is not self:
                out.append(part)
            node = child
        return ".".join(out)


def build_mote_model(model_path: str, config: MoTEConfig, *, dtype=torch.float32, device: str = "cpu",
                     seed: int = 0):
    """Load a base LM + tokenizer, add the stage tokens, wrap it: returns (MoTEModel, tokenizer).

    Seeded, so every training worker builds the same initial experts and new token rows.
    """
    from transformers import AutoModelForCausalLM

    from mote_ray.chat import load_tokenizer
    from mote_ray.models import resolve_model

    resolved = resolve_model(model_path)
    tok = load_tokenizer(resolved)
    tok.padding_side = "right"
    lm = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, attn_implementation="sdpa").to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        first_new = add_stage_tokens(lm, tok)
        model = MoTEModel(lm, config, first_new)
    means = {"emb": model.lm.get_input_embeddings().emb.weight[:first_new].float().mean(0)}
    head = model.lm.get_output_embeddings()
    if head.new_rows is not model.lm.get_input_embeddings().new_rows:
        means["head"] = head.head.weight[:first_new].float().mean(0)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in model.trainable_init(seed, means).items():
            params[name].copy_(value)
    return model, tok
