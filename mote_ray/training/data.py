"""Training examples from the generation job's chains: token ids + stage ids, bucketed into batches."""

from __future__ import annotations

import json
import random
from typing import Literal

import torch

from mote_ray.mote.routing import EXPERTS, NO_STAGE, stage_ids
from mote_ray.stages import Stage, format_chain

Method = Literal["mote", "sft", "lora-chain"]


def example(row: dict, tokenizer, token_ids: dict, method: Method, max_len: int) -> dict | None:
    """One sequence: {"input_ids", "stages"}; None when it does not fit `max_len`."""
    history = [dict(m) for m in row.get("history") or []]
    if method == "sft":  # the paper's SFT baseline: plain answer, no reasoning, no stage tokens
        from mote_ray.chat import encode
        from mote_ray.records import GenerationRequest

        prompt = encode(tokenizer, GenerationRequest(messages=[*history, {"role": "user", "content": row["question"]}]))
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, stages = prompt + answer, [NO_STAGE] * len(prompt) + [EXPERTS.index("answer")] * len(answer)
    else:
        spans = {Stage(s): row.get(s) for s in ("analysis", "guidance", "answer") if row.get(s) is not None}
        text = format_chain(tokenizer, history, row["question"], spans)
        ids = tokenizer(text, add_special_tokens=not (tokenizer.bos_token and text.startswith(tokenizer.bos_token)))["input_ids"]
        stages = stage_ids(ids, token_ids)
    if len(ids) > max_len:
        return None
    return {"input_ids": ids, "stages": stages}


def batches(examples: list[dict], batch_size: int, seed: int, bucket: int = 8) -> list[list[dict]]:
    """Shuffle, then sort within windows of `bucket` batches by length (less padding), then shuffle batches."""
    rng = random.Random(seed)
    ex = examples[:]
    rng.shuffle(ex)
    window = batch_size * bucket
    out = []
    for i in range(0, len(ex), window):
        chunk = sorted(ex[i:i + window], key=lambda e: len(e["input_ids"]))
        out += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (b, t) input_ids, stages (NO_STAGE on padding) and attention_mask."""
    t = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    stages = torch.full((len(batch), t), NO_STAGE, dtype=torch.long)
    att = torch.zeros((len(batch), t), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e["input_ids"])
        ids[i, :n], stages[i, :n], att[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["stages"]), 1
    return {"input_ids": ids, "stages": stages, "attention_mask": att}


PARSEABLE = ("safe", "unsafe")


def _verdicts(row: dict) -> list:
    return [row.get("verdict")] + [a.get("verdict") for a in row.get("attempts") or [] if isinstance(a, dict)]


def flag_kind(row: dict) -> str:
    """Why a flagged chain is flagged: "unparseable" (its last self-check could not be parsed) or
    "unsafe" (it said UNSAFE; a flagged chain without a recorded verdict counts as unsafe)."""
    return "unparseable" if row.get("verdict") == "unparseable" else "unsafe"


def flag_policy(rows: list[dict], include_flagged: bool) -> dict:
    """Which flagged chains train, decided once per chain set (the driver and every worker compute
    the same from the same rows).

    UNSAFE verdicts are never trained on by default. Unparseable verdicts are excluded too while the
    check works (some verdict in the set parses); when not one verdict in the set parses, the check
    gives no signal for this model, so they are trained on, with a warning. `include_flagged`
    trains on every flagged chain. Returns {"unsafe", "unparseable", "policy", "train_unsafe",
    "train_unparseable"}."""
    kinds = [flag_kind(r) for r in rows if r.get("flagged") and _usable_otherwise(r) is None]
    out = {"unsafe": kinds.count("unsafe"), "unparseable": kinds.count("unparseable")}
    if include_flagged:
        return {**out, "policy": "include_flagged: every flagged chain trained on", "train_unsafe": True,
                "train_unparseable": True}
    if out["unparseable"] and not any(v in PARSEABLE for r in rows for v in _verdicts(r)):
        return {**out, "policy": "no verdict in the set parses (the self-check gives no signal for this model): "
                                 "unparseable chains trained on, unsafe ones excluded",
                "train_unsafe": False, "train_unparseable": True}
    return {**out, "policy": "flagged chains excluded (unsafe and unparseable verdicts)", "train_unsafe": False,
            "train_unparseable": False}


def flag_warning(policy: dict) -> str | None:
    """The loud line to print when chains without a usable safety verdict are trained on."""
    if policy["train_unparseable"] and policy["unparseable"] and not policy["train_unsafe"]:
        return (f"WARNING: not one of the chains has a parseable safety verdict, so the model's own check gives no "
                f"signal; training on {policy['unparseable']} chains with unparseable verdicts "
                f"({policy['unsafe']} UNSAFE ones stay excluded). Recorded in train_metrics.json (flagged).")
    return None


def _usable_otherwise(row: dict) -> str | None:
    if row.get("error") is not None:
        return "error"
    if row.get("answer") is None:
        return "no_answer"
    if not row.get("kept", True):
        return "not_kept"
    return None


def drop_reason(row: dict, include_flagged: bool = False, train_unparseable: bool = False) -> str | None:
    """Why a chain is not trained on (None: it is). Flagged chains stay on disk but out of training
    by default (the method learns from chains that passed the model's own check); see flag_policy
    for when unparseable ones train."""
    reason = _usable_otherwise(row)
    if reason:
        return reason
    if row.get("flagged") and not include_flagged and not (train_unparseable and flag_kind(row) == "unparseable"):
        return "flagged"
    return None


def split_by_prompt(rows: list[dict], val_share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val): every chain of one prompt (history + question) on the same side, chosen by a
    seeded hash, so validation measures prompts never trained on. At least one prompt is held out
    when val_share > 0 and there are two or more prompts."""
    import hashlib

    def key(r):
        text = json.dumps([r.get("history") or [], r["question"]], sort_keys=True, default=str)
        return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:12], 16) / 16 ** 12

    if val_share <= 0:
        return rows, []
    keys = {id(r): key(r) for r in rows}
    distinct = sorted(set(keys.values()))
    if len(distinct) < 2:
        return rows, []
    cut = max(val_share, distinct[0] + 1e-12) if distinct[0] >= val_share else val_share
    val = [r for r in rows if keys[id(r)] < cut]
    return [r for r in rows if keys[id(r)] >= cut], val
