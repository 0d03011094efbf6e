"""The MoTE model as a native vLLM model: token-routed experts, continuously batched, prefix-cached.

The expert travels in the token id (../shared/docs/vllm-mote.md): a virtual vocabulary of K·V ids,
id = token + k·V for K stage experts. Inside the model `expert = id // V` and the embedding reads
`id % V`, so every forward (prefill, decode, chunked prefill, recompute after eviction) knows each
token's expert, and the prefix cache — which hashes token ids — keeps and reuses KV exactly as each
token's own expert computed it. Every decoder linear gets the same masked-dense update as training
(mote/layer.py):  y = W0·x + s·(α·B_e A_e x + (1−α)·B_sh A_sh x),  added by a forward hook on the
vLLM layer (fused qkv / gate_up included: one sub-projection's expert per shard). `compute_logits`
tiles the base logits K times; `MoTELogitsProcessor` keeps only the request's expert copy, so the
sampled id already carries the expert that will read it.

The routing is computed inside the inner model's forward (a pre-hook on its input embedding turns
the tagged ids into per-token gates), so a traced graph computes it from each step's ids:
torch.compile (vLLM's trace-once inductor mode on CPU; `mote-ray serve`'s default) gives the
reference's tokens (tests/test_serving.py, 16 chains in flight). Tensor parallel 1 only (the expert tensors are not sharded).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

ARCH = "MoTEForCausalLM"
EXPERT_PREFIX = "mote_expert."  # checkpoint keys of the expert tensors (mote/vllm_dir.py writes them)


class _Routing:
    """The per-forward gates every hooked layer reads: shard count S -> (tokens, S·(E+1)·r)."""

    gates: dict = {}


class MoTEForCausalLM(nn.Module):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.models.utils import init_vllm_registered_model

        cfg = vllm_config.model_config.hf_config
        mote = cfg.mote  # written by mote/vllm_dir.py
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ValueError("the MoTE vLLM model runs with tensor_parallel_size=1 (its experts are not sharded)")
        self.V, self.K = int(mote["base_vocab_size"]), int(mote["n_experts"])
        self.r, self.alpha, self.scaling = int(mote["r"]), float(mote["alpha"]), float(mote["lora_alpha"]) / int(mote["r"])
        inner_cfg = type(cfg).from_dict({**cfg.to_dict(), "vocab_size": self.V, "architectures": [mote["architecture"]]})
        self.inner = init_vllm_registered_model(vllm_config, prefix=prefix, hf_config=inner_cfg,
                                                architectures=[mote["architecture"]])
        self.routing, self.gate_dtype = _Routing(), torch.float32
        self.packed = dict(getattr(type(self.inner), "packed_modules_mapping", {}))
        self.expert_names: dict[str, tuple[str, ...]] = {}  # our parameter prefix -> HF sub-module names
        self.shard_counts: set[int] = set()
        self._wrap(set(mote["targets"]))
        # The expert-tagged ids enter the inner model; its embedding reads `id % V` and sets the gate.
        # Inside the model's own forward, so a compiled graph (torch.compile) computes the routing too.
        embeds = [m for m in self.inner.modules() if type(m).__name__ == "VocabParallelEmbedding"]
        if len(embeds) != 1:
            raise ValueError(f"expected one input embedding in {mote['architecture']}, found {len(embeds)}")
        embeds[0].register_forward_pre_hook(self._route)

    # -- experts ------------------------------------------------------------------------------------
    def _wrap(self, targets: set[str]) -> None:
        """Expert parameters and a hook on every decoder linear whose (sub-)projections were trained."""
        n = self.K + 1
        for name, module in list(self.inner.named_modules()):
            short = name.rsplit(".", 1)[-1]
            subs = tuple(self.packed.get(short, [short]))
            if ".layers." not in f".{name}" or not any(s in targets for s in subs) or not hasattr(module, "weight"):
                continue
            sizes = list(getattr(module, "output_partition_sizes", None) or [module.weight.shape[0]])
            if len(sizes) != len(subs):
                raise ValueError(f"{name}: {len(sizes)} output shards but packed mapping {subs}")
            d_in, dtype, width = module.weight.shape[1], module.weight.dtype, n * self.r
            self.gate_dtype = dtype
            # All shards' A stacked (S·(E+1)·r, d_in) and their B block-diagonal (Σd_out, S·(E+1)·r):
            # two matmuls per layer whatever the fusion, the masked-dense form of mote/layer.py.
            module.mote_A = nn.Parameter(torch.zeros(len(subs) * width, d_in, dtype=dtype), requires_grad=False)
            module.mote_B = nn.Parameter(torch.zeros(sum(sizes), len(subs) * width, dtype=dtype), requires_grad=False)
            module.mote_shards = (len(subs), tuple(sizes))
            self.shard_counts.add(len(subs))
            module.register_forward_hook(self._hook)
            self.expert_names[f"inner.{name}"] = tuple(f"{name.rsplit('.', 1)[0]}.{s}" for s in subs)

    def _hook(self, module, args, output):
        x = args[0]
        out, bias = output if isinstance(output, tuple) else (output, None)
        h = nn.functional.linear(x, module.mote_A) * self.routing.gates[module.mote_shards[0]]
        # B holds scaling·B (folded at load): one fused out + h·Bᵀ — per-token Python overhead is what
        # a decode step of a small model costs, so the hook keeps to three ops.
        out = torch.addmm(out, h, module.mote_B.t()) if out.dim() == 2 else out + nn.functional.linear(h, module.mote_B)
        return (out, bias) if isinstance(output, tuple) else out

    def _gate(self, experts: torch.Tensor) -> torch.Tensor:
        """(tokens,) expert index -> (tokens, (E+1)·r): α on the expert block, 1−α on the shared one."""
        g = nn.functional.one_hot(experts, self.K + 1).to(self.gate_dtype) * self.alpha
        g[:, -1] = 1.0 - self.alpha
        return g.repeat_interleave(self.r, dim=-1)

    def _route(self, module, args):
        """Embedding pre-hook: tagged ids -> the gates every hooked layer of this forward reads
        (one (tokens, S·(E+1)·r) gate per shard count S), and the base ids the embedding reads."""
        ids = args[0]
        gate = self._gate((ids // self.V).clamp(max=self.K - 1).long())
        self.routing.gates = {s: gate.repeat(1, s) for s in self.shard_counts}
        return (ids % self.V, *args[1:])

    # -- vLLM model interface -------------------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_input_ids(input_ids)  # tagged: the embedding's pre-hook reads id % V

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if input_ids is None or inputs_embeds is not None:
            raise RuntimeError("the MoTE model routes by token id: it needs input_ids, not embeddings")
        return self.inner(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.inner.compute_logits(hidden_states)
        return None if logits is None else logits.repeat(1, self.K)  # copy k = token ids read by expert k

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        experts: dict[str, torch.Tensor] = {}

        def base():
            for name, w in weights:
                if name.startswith(EXPERT_PREFIX):
                    experts[name.removeprefix(EXPERT_PREFIX)] = w
                else:
                    yield name, w

        loaded = {f"inner.{n}" for n in self.inner.load_weights(base())}
        return loaded | self._load_experts(experts)

    def _load_experts(self, tensors: dict[str, torch.Tensor]) -> set[str]:
        """Our stacked (sub, (E+1)·r, d_in) A and per-sub (d_out, (E+1)·r) B from training's per-layer A/B."""
        loaded, modules = set(), dict(self.named_modules())
        for pname, subs in self.expert_names.items():
            module = modules[pname]
            width, offsets = (self.K + 1) * self.r, [0]
            for d in module.mote_shards[1]:
                offsets.append(offsets[-1] + d)
            for s, sub in enumerate(subs):
                a, b = tensors.pop(f"{sub}.lora_A", None), tensors.pop(f"{sub}.lora_B", None)
                if a is None or b is None:
                    continue  # this sub-projection was not a target: its expert stays zero (exact)
                with torch.no_grad():  # training: A (E+1, r, d_in), B (d_out, E+1, r)
                    module.mote_A[s * width:(s + 1) * width].copy_(a.reshape(-1, a.shape[-1]))
                    module.mote_B[offsets[s]:offsets[s + 1], s * width:(s + 1) * width].copy_(
                        b.reshape(b.shape[0], -1) * self.scaling)  # scaling folded in (see _hook)
            loaded |= {f"{pname}.mote_A", f"{pname}.mote_B"}
        if tensors:
            raise ValueError(f"expert tensors for layers this model does not have: {sorted(tensors)[:3]}")
        return loaded


class MoTELogitsProcessor:
    """Keeps only the request's expert copy of the tiled logits (and bans its `mote_banned` ids).

    Per request via `SamplingParams.extra_args = {"mote_expert": k, "mote_banned": [...]}`; requests
    without `mote_expert` are left alone (stage choices use `allowed_token_ids` on tagged ids). One
    class serves both vLLM runners — V1 (`update_state`/`apply(logits)`, the CPU runner without
    Triton) and V2 (`add_request`/`apply(logits, ctx)`, the GPU default) — because vLLM decides which
    runner to use inside the engine (Triton, feature set), after the processor is chosen.
    """

    def __init__(self, vllm_config, *args):
        self.V = int(vllm_config.model_config.hf_config.mote["base_vocab_size"])
        self.K = int(vllm_config.model_config.hf_config.mote["n_experts"])
        self.req: dict[int, tuple[int, tuple[int, ...]]] = {}  # batch index (V1) or slot (V2) -> (expert, banned)
        self._cols: torch.Tensor | None = None

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = sampling_params.extra_args or {}
        if "mote_expert" in extra and not isinstance(extra["mote_expert"], int):
            raise ValueError(f"mote_expert must be an int expert index, got {extra['mote_expert']!r}")

    @staticmethod
    def _state(params):
        extra = params.extra_args or {}
        return None if extra.get("mote_expert") is None else (int(extra["mote_expert"]), tuple(extra.get("mote_banned", ())))

    def is_argmax_invariant(self) -> bool:
        return False

    # V1 runner
    def update_state(self, batch_update) -> None:
        from vllm.v1.sample.logits_processor.interface import MoveDirectionality

        if batch_update is None:
            return
        for i in batch_update.removed:
            self.req.pop(i, None)
        for i, params, _, _ in batch_update.added:
            state = self._state(params)
            self.req.pop(i, None) if state is None else self.req.__setitem__(i, state)
        for a, b, direction in batch_update.moved:
            sa, sb = self.req.pop(a, None), self.req.pop(b, None)
            if sa is not None:
                self.req[b] = sa
            if sb is not None and direction == MoveDirectionality.SWAP:
                self.req[a] = sb

    # V2 runner
    def add_request(self, req_idx: int, sampling_params) -> bool:
        state = self._state(sampling_params)
        self.req.pop(req_idx, None) if state is None else self.req.__setitem__(req_idx, state)
        return state is not None

    def apply_staged_writes(self) -> None:  # V2: our per-request state lives on the host
        pass

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if not self.req:
            return logits
        keys = range(logits.shape[0]) if ctx is None else ctx.expanded_idx_mapping.tolist()
        states = [self.req.get(k) for k in keys]
        expert = torch.tensor([-1 if st is None else st[0] for st in states], device=logits.device)
        if self._cols is None or self._cols.device != logits.device:
            self._cols = torch.arange(self.K * self.V, device=logits.device) // self.V  # the copy of each column
        # Rows of MoTE requests keep their expert's copy only; other rows are left alone.
        drop = (self._cols[None, :] != expert[:, None]) & (expert[:, None] >= 0)
        logits.masked_fill_(drop, float("-inf"))
        rows = [i for i, st in enumerate(states) if st is not None for _ in st[1]]
        if rows:
            cols = [st[0] * self.V + t for st in states if st is not None for t in st[1]]
            logits[rows, cols] = float("-inf")
        return logits


def _as_both_interfaces():
    """MoTELogitsProcessor registered as a subclass of both runners' abstract interfaces."""
    from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2

    V1.register(MoTELogitsProcessor)
    V2.register(MoTELogitsProcessor)
    return MoTELogitsProcessor


def register() -> None:
    """`vllm.general_plugins` entry point: vLLM calls it in every process that builds models."""
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, "mote_ray.mote.vllm_model:MoTEForCausalLM")
    _as_both_interfaces()
