"""Training efficiency, measured side by side in one run on the tiny real model (CPU).

    .venv/bin/python benchmarks/training.py  ->  benchmarks/results/training.json
    .venv/bin/python benchmarks/training.py --sharded-only   (d) and (e) alone, merged into it

(a) The paper's claim: one MoTE pass over full chains (step skipping on) vs training on the
    expanded per-stage datasets built from the same chains — Q→A, Q+A→G, Q+A+G→R — with the same
    supervised tokens (A, G, R once each). FLOPs are counted as tokens processed (forward+backward
    scale with them for a fixed model; attention's quadratic term is left out, which favours the
    expanded side). Time: one epoch of each with the same tokens per batch.
(b) MoTE step time vs one PEFT LoRA of the same rank and of rank 4r on all linear layers.
(c) Ray Train tokens/s with 1 vs 2 workers (FSDP2 over gloo).
(d) Sharding really shards: a worker's peak resident memory above its own baseline (taken in the
    worker before the model exists), with 2 workers / with 1, same model, chains and batch, on a
    randomly initialised model of a real architecture's shape: Qwen2.5-0.5B's config (24 layers,
    hidden 896, GQA 14/2 heads, MLP 4864, tied embeddings) with the vocabulary of the local
    tokenizer (512 + the stage tokens; no hub tokenizer offline), 358M parameters. Its weights are
    written once as safetensors and loaded per rank by the training job (meta init, sharded load).
(e) bf16 vs fp32 optimizer-step time of that model on this host (one process, interleaved).
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
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import SHARED, model, write_result  # noqa: E402

import torch  # noqa: E402

N_CHAINS, BATCH_TOKENS, R = 128, 2048, 16


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


def epoch_time(model, batches, pad_id, p_skip, route_by_target=False) -> float:
    from mote_ray.mote.routing import expert_index, skip_mask
    from mote_ray.training.data import collate
    from mote_ray.training.losses import stage_nll

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
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


def step_times(fn, n=12) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def routing_cost(base_path) -> dict:
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
    res = {"mote": step_times(trainer(lambda: mote(ids, experts), [p for p in mote.parameters() if p.requires_grad]))}
    for name, r in (("lora_r", R), ("lora_4r", 4 * R)):
        lm = AutoModelForCausalLM.from_pretrained(base_path, attn_implementation="sdpa")
        peft = get_peft_model(lm, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
        res[name] = step_times(trainer(lambda: peft(input_ids=ids), [p for p in peft.parameters() if p.requires_grad]))
    return res


def workers_throughput(base_path) -> dict:
    import ray
    import pyarrow as pa

    from mote_ray.generation import CHAIN_SCHEMA, write_atomic
    from mote_ray.training.run import TrainConfig, run_train

    tmp = Path(tempfile.mkdtemp(prefix="mote-bench-train-"))
    rows = [{**c, "id": f"b{i}", "source": "bench", "row": i, "stages": [], "attempts": [], "verdict": "safe",
             "flagged": False, "kept": True, "error": None, "model": "m", "engine": "e", "prompt_tokens": 0,
             "completion_tokens": 0, "stage_tokens": [], "generation_seconds": 0.0, "created_at": 0}
            for i, c in enumerate(real_chains(N_CHAINS))]
    (tmp / "gen" / "chains").mkdir(parents=True)
    write_atomic(pa.Table.from_pylist(rows, schema=CHAIN_SCHEMA), tmp / "gen" / "chains")
    out = {}
    for workers in (1, 2):
        m = run_train(TrainConfig(model=base_path, workers=workers, max_steps=16, batch_size=8, checkpoint_every=16,
                                  mote={"r": R}), tmp / "gen", tmp / f"w{workers}")
        out[workers] = statistics.median(h["tokens_per_s"] for h in m["history"][3:])
        ray.shutdown()
    return out


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


def precision_step_time(path: str, reps: int = 3) -> dict:
    """Median optimizer-step time of the MoTE model in fp32 and in bf16 (frozen base in bf16, fp32
    experts), interleaved A, B, A, B after one warm-up step each."""
    from mote_ray.mote.model import MoTEConfig, build_mote_model
    from mote_ray.mote.routing import expert_index

    torch.manual_seed(0)
    ids = torch.randint(3, 500, (1, 64))
    experts = expert_index(torch.randint(0, 3, (1, 64)), "answer")
    steps = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model, _ = build_mote_model(path, MoTEConfig(r=R), dtype=dtype)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt, dtype=dtype):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                model(ids, experts).logits.float().mean().backward()
            opt.step()
            opt.zero_grad()
        step()
        steps[name] = step
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "spread_s": max(v) - min(v), "all_s": v} for k, v in times.items()}


def sharded_only() -> None:
    """`--sharded-only`: re-measure (d) and (e) alone and merge them into the existing results file
    (each ratio's two sides still run side by side in this one run)."""
    from common import RESULTS

    big, n_params = big_model(model("stories260K"))
    mem = sharded_memory(big)
    prec = precision_step_time(big)
    path = RESULTS / "training.json"
    old = json.loads(path.read_text()) if path.is_file() else {"ratios": {}, "raw": {}, "config": {}}
    ratios = {**old["ratios"], "peak_rss_2_vs_1_worker": mem[2]["peak_rss_above_baseline_mb"] / mem[1]["peak_rss_above_baseline_mb"],
              "bf16_vs_fp32_step_time": prec["bf16"]["median_s"] / prec["fp32"]["median_s"]}
    raw = {**old.get("raw", {}), "sharded_memory_by_workers": mem, "step_time_by_dtype": prec,
           "sharded_model": {"config": "Qwen2.5-0.5B shape (Qwen2Config) with the local 512-token vocabulary",
                             **QWEN25_05B, "params": n_params, "device": "cpu", "gpu": "no device lent"}}
    write_result("training", ratios, raw=raw, config=old.get("config", {}))


def main() -> None:
    from mote_ray.mote.model import MoTEConfig, build_mote_model
    from mote_ray.mote.routing import stage_token_ids

    if "--sharded-only" in sys.argv:
        return sharded_only()
    base_path = model("stories260K")
    torch.manual_seed(0)
    m, tok = build_mote_model(base_path, MoTEConfig(r=R, p_skip=0.2))
    mote_seqs, expanded = sequences(real_chains(N_CHAINS), tok, stage_token_ids(tok))
    processed = lambda xs: sum(len(e["input_ids"]) for e in xs)  # noqa: E731
    supervised = lambda xs: sum(sum(s >= 0 for s in e["stages"][1:]) for e in xs)  # noqa: E731
    mote_t = epoch_time(m, token_batches(mote_seqs, BATCH_TOKENS), tok.pad_token_id, 0.2)
    m2, _ = build_mote_model(base_path, MoTEConfig(r=R, p_skip=0.0))
    exp_t = epoch_time(m2, token_batches(expanded, BATCH_TOKENS), tok.pad_token_id, 0.0, route_by_target=True)
    print(f"(a) mote: {processed(mote_seqs)} tokens, {mote_t:.2f}s; expanded: {processed(expanded)} tokens, {exp_t:.2f}s",
          flush=True)
    steps = routing_cost(base_path)
    print(f"(b) step times: {steps}", flush=True)
    tps = workers_throughput(base_path)
    print(f"(c) tokens/s by workers: {tps}", flush=True)
    big, n_params = big_model(base_path)
    mem = sharded_memory(big)
    prec = precision_step_time(big)
    print(f"(e) step time by dtype: {prec}", flush=True)
    write_result(
        "training",
        {"mote_vs_expanded_flops": processed(mote_seqs) / processed(expanded), "mote_vs_expanded_time": mote_t / exp_t,
         "mote_vs_lora_step_time": steps["mote"] / steps["lora_r"], "mote_vs_lora_4r_step_time": steps["mote"] / steps["lora_4r"],
         "two_vs_one_worker": tps[2] / tps[1],
         "peak_rss_2_vs_1_worker": mem[2]["peak_rss_above_baseline_mb"] / mem[1]["peak_rss_above_baseline_mb"],
         "bf16_vs_fp32_step_time": prec["bf16"]["median_s"] / prec["fp32"]["median_s"]},
        raw={"tokens_processed": {"mote": processed(mote_seqs), "expanded": processed(expanded)},
             "tokens_supervised": {"mote": supervised(mote_seqs), "expanded": supervised(expanded)},
             "epoch_seconds": {"mote": mote_t, "expanded": exp_t}, "step_seconds": steps, "tokens_per_s_by_workers": tps,
             "sharded_memory_by_workers": mem, "step_time_by_dtype": prec,
             "sharded_model": {"config": "Qwen2.5-0.5B shape (Qwen2Config) with the local 512-token vocabulary",
                               **QWEN25_05B, "params": n_params, "device": "cpu", "gpu": "no device lent"}},
        config={"model": base_path, "chains": N_CHAINS, "batch_tokens": BATCH_TOKENS, "r": R,
                "paper": {"flops": 0.35, "time": 0.67}},
    )


if __name__ == "__main__":
    main()
