"""MoTELinear: one LoRA expert per stage plus a shared expert on a frozen linear layer.

    y = W0·x + s·(α·B_e A_e x + (1−α)·B_sh A_sh x),   e = the token's stage expert, s = lora_alpha / r

Masked-dense form (design.md, "measured" note): all experts' A are one ((E+1)·r × d_in) matrix, the
product is multiplied by a per-token gate holding α on the token's expert block and 1−α on the
shared block (0 elsewhere), then one B matmul. One pass for every token of a batch, no loop over
experts, and exact: the zeroed blocks contribute nothing, and get no gradient.
Weights are stored per expert (`lora_A[e]`, `lora_B[e]`, like PEFT's per-adapter dicts, indexed by
EXPERTS) and exported to PEFT's format by mote/export.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MoTELinear(nn.Module):
    def __init__(self, base: nn.Linear, n_experts: int, r: int, lora_alpha: float, alpha: float,
                 routing: "RoutingState"):
        super().__init__()
        self.base, self.n_experts, self.r, self.alpha = base, n_experts, r, alpha
        self.scaling = lora_alpha / r
        self.routing = routing  # shared, set once per forward by MoTEModel
        n = n_experts + 1  # + shared (last block)
        # Experts are fp32 master weights whatever the base's (compute) dtype; FSDP2's mixed-precision
        # policy casts them for compute, and the forward casts when there is no FSDP.
        dev, dtype = base.weight.device, torch.float32
        # (E+1, r, d_in) and (d_out, E+1, r): viewed as one stacked A and one B without copies.
        self.lora_A = nn.Parameter(torch.empty(n, r, base.in_features, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, n, r, device=dev, dtype=dtype))
        for e in range(n):  # PEFT's init: kaiming-uniform A, zero B (the layer starts as the base)
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def gate(self, expert_idx: torch.Tensor) -> torch.Tensor:
        """(batch, seq) expert index -> (batch, seq, (E+1)*r) gate: α on the expert block, 1−α on shared."""
        n, r = self.n_experts + 1, self.r
        if self.n_experts == 0:  # plain LoRA (baselines): the shared expert alone, weight 1
            return torch.ones(*expert_idx.shape, r, device=expert_idx.device, dtype=self.lora_A.dtype)
        onehot = nn.functional.one_hot(expert_idx, n).to(self.lora_A.dtype) * self.alpha
        onehot[..., -1] = 1.0 - self.alpha
        return onehot.repeat_interleave(r, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        gate = self.routing.gate_for(self)  # (batch, seq, (E+1)*r), cached per forward
        a = self.lora_A.reshape(-1, self.base.in_features)
        b = self.lora_B.reshape(self.base.out_features, -1)
        if self.n_experts == 0:
            a, b = a[-self.r:], b[:, -self.r:]
        h = nn.functional.linear(x.to(a.dtype), a) * gate
        return out + nn.functional.linear(h, b).to(out.dtype) * self.scaling


class RoutingState:
    """Per-forward routing shared by every MoTELinear: the (batch, seq) expert index and its gates."""

    def __init__(self):
        self.expert_idx: torch.Tensor | None = None
        self._gates: dict[tuple, torch.Tensor] = {}

    def set(self, expert_idx: torch.Tensor) -> None:
        self.expert_idx, self._gates = expert_idx, {}

    def gate_for(self, layer: MoTELinear) -> torch.Tensor:
        if self.expert_idx is None:
            raise RuntimeError("MoTE routing not set: call MoTEModel.forward with expert_idx")
        key = (layer.r, layer.n_experts, layer.alpha, layer.lora_A.dtype, layer.lora_A.device)
        if key not in self._gates:  # all layers of one shape share one gate tensor per forward
            self._gates[key] = layer.gate(self.expert_idx.to(layer.lora_A.device))
        return self._gates[key]
