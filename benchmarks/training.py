"""Training efficiency, measured side by side in one run on the tiny real model (CPU).

    .venv/bin/python benchmarks/training.py  ->  benchmarks/results/training.json
    .venv/bin/python benchmarks/training.py --sharded-only   (d) and (e) alone, merged into it

(a) The paper's claim: one MoTE pass over full chains (step skipping on) vs training on the
    expanded per-stage datasets built from the same chains — Q→A, Q+A→G, Q+A+G→R — with the same
    supervised tokens (A, G, R once each). FLOPs are counted as tokens processed (forward+backward
    scale with them for a fixed model; attention's quadratic term is left out, which favours the
    expanded side). Time: one epoch of each side with the same tokens per batch.
(b) MoTE step time vs one PEFT LoRA of the same rank and of rank 4r on all linear layers (the same
    8 x 256 tokens on every side; a side's value in a round is the median of STEPS steps).
(c) Ray Train tokens/s with 1 vs 2 workers (FSDP2 over gloo).
(d) Sharding really shards: a worker's peak resident memory above its own baseline (taken in the
    worker before the model exists), with 2 workers / with 1, same model, chains and batch, on a
    randomly initialised model of a real architecture's shape: Qwen2.5-0.5B's config (24 layers,
    hidden 896, GQA 14/2 heads, MLP 4864, tied embeddings) with the vocabulary of the local
    tokenizer (512 + the stage tokens; no hub tokenizer offline), 358M parameters. Its weights are
    written once as safetensors and loaded per rank by the training job (meta init, sharded load).
(e) bf16 vs fp32 optimizer-step time of that model on this host, 1 x 32 tokens (one step per side
    per round; at most 3 rounds: a bf16 step takes tens of seconds on a CPU without bf16
    instructions). bf16 is fast only with bf16 instructions (AVX-512 BF16 / AMX); on an AVX2-only
    CPU (the AMD EPYC that wrote results/training.json) it is many times slower than fp32.
Every timed ratio — (a), (b), (c), (e) — is measured the same way (common.interleave): each side
runs once as a warm-up, then the sides take turns (A, B, A, B, ...) for ROUNDS rounds; the ratio is
taken per round, `ratios` holds its median and `spread` every round's value with (max - min) /
median. (a), (b) and (e) run with THREADS torch threads (1), the thread count a Ray Train worker gets
here (one CPU -> OMP_NUM_THREADS=1): they measure what a training worker does, and a process on the
other core cannot stall them. With two threads on two cores, every parallel region waits for the
thread another process preempted: an fp32 step of (e) went from 1.3 s to 55 s while a test ran.
(d) is memory, not time: one run per side.
Chains come from real data: AdvBench goal as the question, AdvBench target as the analysis, an
Alpaca instruction as the guidance, an HH-RLHF assistant turn as the answer.
"""

from __future__ import annotations

import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

sys.path.insert(0, os.path.dirname(__file__))
from common import SHARED, interleave, model, per_round, summary, timed, write_result  # noqa: E402

import torch  # noqa: E402

N_CHAINS, BATCH_TOKENS, R = 128, 2048, 16
ROUNDS = int(os.environ.get("MOTE_BENCH_ROUNDS", 5))
THREADS = int(os.environ.get("MOTE_BENCH_THREADS", 1))
STEPS = 5  # (b): steps per side per round


def real_chains(n: int) -> list[dict]:
    import csv

    d = SHARED / "datasets"
    adv = list(csv.DictReader(open(d / "advbench/harmful_behaviors.csv")))
    alpaca = json.loads((d / "alpaca_instructions/alpaca.json").read_text())
    hh = [json.loads(line)["chosen"].rsplit("\n\nAssistant: ", 1)[-1] for line, _ in
          zip(gzip.open(d / "hh_rlhf_harmless/harmless-base/test.jsonl.gz", "rt"), range(n))]
    return [{"history": [], "question": adv[i]["goal"], "analysis": adv[i]["target"], "guidance": alpaca[i]["instruction"],
             "answer": hh[i][:400]} for i in range(n)]


def sequences(chains, tok, token_ids):
    """MoTE sequences and the expanded per-stage sequences (stage ids mark the supervised span only)."""
    from mote_ray.mote.routing import NO_STAGE
    from mote_ray.training.data import example

    mote, expanded = [], []
    for c in chains:
        ex = example(c, tok, token_ids, "mote", 512)
        if ex is None:
            continue
        mote.append(ex)
        st = ex["stages"]
        for stage in (0, 1, 2):  # prefix through this stage's span; supervise only that span
            end = max(i for i, s in enumerate(st) if s == stage) + 1
            expanded.append({"input_ids": ex["input_ids"][:end],
                             "stages": [s if s == stage else NO_STAGE for s in st[:end]]})
    return mote, expanded


def token_batches(examples, tokens_per_batch):
    out, cur = [], []
    for e in sorted(examples, key=lambda e: len(e["input_ids"])):
        if cur and (len(cur) + 1) * len(e["input_ids"]) > tokens_per_batch:
            out.append(cur)
            cur = []
        cur.append(e)
    return out + ([cur] if cur else [])


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def epoch_side(model, batches, pad_id, p_skip, route_by_target=False) -> Callable[[], float]:
    """One training epoch over `batches` as a side returning its seconds. The optimizer lives across
    rounds and the generator is reseeded, so every round does the same steady-state work."""
    from mote_ray.mote.routing import expert_index, skip_mask
    from mote_ray.training.data import collate
    from mote_ray.training.losses import stage_nll

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator()

    def epoch() -> float:
        gen.manual_seed(0)
        t0 = time.perf_counter()
        for b in batches:
            batch = collate(b, pad_id)
            experts = expert_index(batch["stages"], "random", gen)
            if route_by_target:  # an expanded sample trains its target stage's expert on every token
                target = batch["stages"].max(dim=1).values[:, None]
                experts = target.expand_as(experts)
            mask = skip_mask(batch["stages"], batch["attention_mask"], p_skip, gen)
            loss, _ = stage_nll(model(batch["input_ids"], experts, attention_mask=mask).logits, batch["input_ids"],
                                batch["stages"])
            loss.backward()
            opt.step()
            opt.zero_grad()
        return time.perf_counter() - t0
    return epoch


def expanded_vs_mote(base_path: str, mote_seqs, expanded, pad_id: int) -> dict[str, list[float]]:
    """(a) epoch seconds per round of each side."""
    from mote_ray.mote.model import MoTEConfig, build_mote_model

    m, _ = build_mote_model(base_path, MoTEConfig(r=R, p_skip=0.2))
    m2, _ = build_mote_model(base_path, MoTEConfig(r=R, p_skip=0.0))
    return interleave({"expanded": epoch_side(m2, token_batches(expanded, BATCH_TOKENS), pad_id, 0.0, True),
                       "mote": epoch_side(m, token_batches(mote_seqs, BATCH_TOKENS), pad_id, 0.2)}, ROUNDS)


def median_step(step: Callable[[], None]) -> Callable[[], float]:
    """A side whose value is the median seconds of STEPS consecutive steps."""
    return lambda: statistics.median(timed(step)() for _ in range(STEPS))


def routing_cost(base_path) -> dict[str, list[float]]:
    """(b) per round, the median step seconds of MoTE, LoRA r and LoRA 4r on the same batch."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mote_ray.mote.model import MoTEConfig, build_mote_model

    torch.manual_seed(0)
    ids = torch.randint(3, 500, (8, 256))
    experts = torch.randint(0, 3, (8, 256))

    def trainer(forward, params):
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            forward().logits.float().mean().backward()
            opt.step()
            opt.zero_grad()
        return step

    mote, _ = build_mote_model(base_path, MoTEConfig(r=R))
    sides = {"mote": median_step(trainer(lambda: mote(ids, experts),
                                         [p for p in mote.parameters() if p.requires_grad]))}
    for name, r in (("lora_r", R), ("lora_4r", 4 * R)):
        lm = AutoModelForCausalLM.from_pretrained(base_path, attn_implementation="sdpa")
        peft = get_peft_model(lm, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
        sides[name] = median_step(trainer(lambda peft=peft: peft(input_ids=ids),
                                          [p for p in peft.parameters() if p.requires_grad]))
    return interleave(sides, ROUNDS)


def workers_throughput(base_path) -> dict[str, list[float]]:
    """(c) per round, Ray Train tokens/s with 1 and with 2 workers: the median over steps 4-16 of one
    16-step run each (the same chains, batch and model; one Ray instance for all runs)."""
    import ray
    import pyarrow as pa

    from mote_ray.cluster import init_ray
    from mote_ray.generation import CHAIN_SCHEMA, write_atomic
    from mote_ray.training.loop import STATE_FILE
    from mote_ray.training.run import TrainConfig, fit

    tmp = Path(tempfile.mkdtemp(prefix="mote-bench-train-"))
    rows = [{**c, "id": f"b{i}", "source": "bench", "row": i, "stages": [], "attempts": [], "verdict": "safe",
             "flagged": False, "kept": True, "error": None, "model": "m", "engine": "e", "prompt_tokens": 0,
             "completion_tokens": 0, "stage_tokens": [], "generation_seconds": 0.0, "created_at": 0}
            for i, c in enumerate(real_chains(N_CHAINS))]
    (tmp / "chains").mkdir(parents=True)
    write_atomic(pa.Table.from_pylist(rows, schema=CHAIN_SCHEMA), tmp / "chains")
    files = sorted((tmp / "chains").glob("*.parquet"))
    resources = init_ray(None)

    def side(workers: int) -> Callable[[], float]:
        def run() -> float:
            cfg = TrainConfig(model=base_path, workers=workers, max_steps=16, batch_size=8, checkpoint_every=16,
                              mote={"r": R}, tracking={"mlflow": None})
            result = fit(cfg, files, Path(tempfile.mkdtemp(dir=tmp)), base_path, False, resources)
            if result.error:
                raise RuntimeError(f"training with {workers} worker(s) failed: {result.error}")
            with result.checkpoint.as_directory() as d:
                history = json.loads((Path(d) / STATE_FILE).read_text())["history"]
            return statistics.median(h["tokens_per_s"] for h in history[3:])
        return run

    runs = interleave({"1": side(1), "2": side(2)}, ROUNDS)
    ray.shutdown()
    return runs


QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, hidden_act="silu")


def big_model(tokenizer_path: str) -> tuple[str, int]:
    """The Qwen2.5-0.5B-shaped model, random weights, saved once as safetensors; (path, params)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    path = Path(tempfile.mkdtemp(prefix="mote-bench-qwen2-"))
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    cfg = Qwen2Config(**QWEN25_05B, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in lm.parameters())
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    del lm
    return str(path), n


def short_chains_dir(n: int) -> Path:
    """A generation-output folder of n real chains cut short (the memory measure needs few tokens)."""
    import pyarrow as pa

    from mote_ray.generation import CHAIN_SCHEMA, write_atomic

    tmp = Path(tempfile.mkdtemp(prefix="mote-bench-short-"))
    rows = [{**{k: (v[:60] if isinstance(v, str) else v) for k, v in c.items()}, "id": f"s{i}", "source": "bench",
             "row": i, "stages": [], "attempts": [], "verdict": "safe", "flagged": False, "kept": True, "error": None,
             "model": "m", "engine": "e", "prompt_tokens": 0, "completion_tokens": 0, "stage_tokens": [],
             "generation_seconds": 0.0, "created_at": 0} for i, c in enumerate(real_chains(n))]
    (tmp / "chains").mkdir(parents=True)
    write_atomic(pa.Table.from_pylist(rows, schema=CHAIN_SCHEMA), tmp / "chains")
    return tmp


def sharded_memory(path: str) -> dict:
    """Peak RSS above baseline per worker (max over ranks) with 1 and 2 FSDP2 workers, side by side."""
    import ray

    from mote_ray.cluster import init_ray
    from mote_ray.training.run import TrainConfig, fit

    chains = short_chains_dir(16)
    files = sorted((chains / "chains").glob("*.parquet"))
    out = {}
    for workers in (1, 2):
        resources = init_ray(None)
        # Activation checkpointing on both sides: activations are per-worker work, not what sharding
        # saves, so keeping them small lets the measure show the sharded weights.
        cfg = TrainConfig(model=path, workers=workers, max_steps=2, batch_size=1, checkpoint_every=2, val_share=0.0,
                          max_len=256, activation_checkpointing=True, mote={"r": R}, tracking={"mlflow": None})
        run = Path(tempfile.mkdtemp(prefix=f"mote-bench-rss{workers}-"))
        t0 = time.perf_counter()
        result = fit(cfg, files, run, path, False, resources)
        if result.error:
            raise RuntimeError(f"sharded memory run with {workers} workers failed: {result.error}")
        out[workers] = {"peak_rss_above_baseline_mb": result.metrics["peak_rss_above_baseline_mb"],
                        "seconds": time.perf_counter() - t0, "tokens_per_s": result.metrics["tokens_per_s"]}
        print(f"(d) {workers} worker(s): {out[workers]}", flush=True)
        ray.shutdown()
    return out


def precision_step_time(path: str) -> dict[str, list[float]]:
    """(e) per round, one optimizer step's seconds of the MoTE model in fp32 and in bf16 (frozen base
    in bf16, fp32 experts)."""
    from mote_ray.mote.model import MoTEConfig, build_mote_model
    from mote_ray.mote.routing import expert_index

    torch.manual_seed(0)
    ids = torch.randint(3, 500, (1, 32))
    experts = expert_index(torch.randint(0, 3, (1, 32)), "answer")
    steps = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model, _ = build_mote_model(path, MoTEConfig(r=R), dtype=dtype)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt, dtype=dtype):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                model(ids, experts).logits.float().mean().backward()
            opt.step()
            opt.zero_grad()
        steps[name] = timed(step)
    return interleave(steps, min(ROUNDS, 3))


def sharded_ratios(mem: dict, prec: dict) -> tuple[dict, dict]:
    """(d) and (e): their ratios and (e)'s spread."""
    bf16 = summary(per_round(prec["bf16"], prec["fp32"]))
    return ({"peak_rss_2_vs_1_worker": mem[2]["peak_rss_above_baseline_mb"] / mem[1]["peak_rss_above_baseline_mb"],
             "bf16_vs_fp32_step_time": bf16["median"]}, {"bf16_vs_fp32_step_time": bf16})


SHARDED_MODEL = {"config": "Qwen2.5-0.5B shape (Qwen2Config) with the local 512-token vocabulary", **QWEN25_05B,
                 "device": "cpu", "gpu": "no device lent"}


def sharded_only() -> None:
    """`--sharded-only`: re-measure (d) and (e) alone and merge them into the existing results file
    (each ratio's two sides still run side by side in this one run)."""
    from common import RESULTS

    big, n_params = big_model(model("stories260K"))
    mem = sharded_memory(big)
    with torch_threads(THREADS):
        prec = precision_step_time(big)
    path = RESULTS / "training.json"
    old = json.loads(path.read_text()) if path.is_file() else {"ratios": {}, "raw": {}, "config": {}}
    ratios, spread = sharded_ratios(mem, prec)
    raw = {**old.get("raw", {}), "sharded_memory_by_workers": mem, "step_seconds_by_dtype": prec,
           "sharded_model": {**SHARDED_MODEL, "params": n_params}}
    write_result("training", {**old["ratios"], **ratios}, spread={**old.get("spread", {}), **spread}, raw=raw,
                 config=old.get("config", {}))


def main() -> None:
    from mote_ray.mote.model import MoTEConfig, build_mote_model
    from mote_ray.mote.routing import stage_token_ids

    if "--sharded-only" in sys.argv:
        return sharded_only()
    base_path = model("stories260K")
    _, tok = build_mote_model(base_path, MoTEConfig(r=R))
    mote_seqs, expanded = sequences(real_chains(N_CHAINS), tok, stage_token_ids(tok))
    processed = lambda xs: sum(len(e["input_ids"]) for e in xs)  # noqa: E731
    supervised = lambda xs: sum(sum(s >= 0 for s in e["stages"][1:]) for e in xs)  # noqa: E731
    print(f"(a) mote: {processed(mote_seqs)} tokens; expanded: {processed(expanded)} tokens", flush=True)
    with torch_threads(THREADS):
        epochs = expanded_vs_mote(base_path, mote_seqs, expanded, tok.pad_token_id)
        steps = routing_cost(base_path)
    tps = workers_throughput(base_path)
    big, n_params = big_model(base_path)
    mem = sharded_memory(big)
    with torch_threads(THREADS):
        prec = precision_step_time(big)
    spread = {"mote_vs_expanded_time": summary(per_round(epochs["mote"], epochs["expanded"])),
              "mote_vs_lora_step_time": summary(per_round(steps["mote"], steps["lora_r"])),
              "mote_vs_lora_4r_step_time": summary(per_round(steps["mote"], steps["lora_4r"])),
              "two_vs_one_worker": summary(per_round(tps["2"], tps["1"]))}
    sharded, sharded_spread = sharded_ratios(mem, prec)
    write_result(
        "training",
        {"mote_vs_expanded_flops": processed(mote_seqs) / processed(expanded),
         **{k: v["median"] for k, v in spread.items()}, **sharded},
        spread={**spread, **sharded_spread},
        raw={"tokens_processed": {"mote": processed(mote_seqs), "expanded": processed(expanded)},
             "tokens_supervised": {"mote": supervised(mote_seqs), "expanded": supervised(expanded)},
             "epoch_seconds": epochs, "step_seconds": steps, "tokens_per_s_by_workers": tps,
             "sharded_memory_by_workers": mem, "step_seconds_by_dtype": prec,
             "sharded_model": {**SHARDED_MODEL, "params": n_params}},
        config={"model": base_path, "chains": N_CHAINS, "batch_tokens": BATCH_TOKENS, "r": R,
                "rounds": {"a_b_c": ROUNDS, "e": min(ROUNDS, 3)}, "steps_per_round": STEPS,
                "torch_threads": THREADS, "precision_step_tokens": 32,
                "order": "every side once as a warm-up, then the sides in turn (A, B, A, B, ...) for each round; "
                         "ratios = median over rounds of the per-round ratio",
                "paper": {"flops": 0.35, "time": 0.67}},
    )

if __name__ == "__main__":
    main()
