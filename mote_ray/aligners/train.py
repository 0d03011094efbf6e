"""`mote-ray aligners train`: one aligner model and one inspector per criterion -> a squad directory.

Aligner: a small causal LM fine-tuned (full, or LoRA merged afterwards) on
`x [INIT] y [ALIGNED] y' [DONE]` with the loss only on y' and [DONE]; the three markers are added as
special tokens, so `[DONE]` is one token both engines stop on (`stop_token_ids`), never the first
period. Trained with Ray Train (TorchTrainer; DDP over gloo/nccl with several workers).
Inspector: P(aligned | x, y), a logistic regression on the all-MiniLM-L6-v2 embedding of the pair,
trained on y (label 0) vs y' (label 1) from rows whose critique found a fault and whose y and y'
differ meaningfully (embedding cosine similarity below `min_difference`, default 0.95); accuracy
and AUC on held-out questions.

    OUT/squad.json                  criteria, threshold, paths, metrics
    OUT/aligners/<criterion>/       a plain model directory (both engines load it)
    OUT/inspectors/<criterion>.json the fitted inspector
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mote_ray.errors import MoteError

MARKERS = ("[INIT]", "[ALIGNED]", "[DONE]")


class AlignerTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None  # the aligners' base LM; None = $MOTE_MODEL or the offline default
    method: Literal["full", "lora"] = "full"
    lora_r: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    max_len: int = Field(384, ge=32)
    workers: int = Field(1, ge=1)
    held_out: float = Field(0.25, gt=0, lt=1)  # questions kept out of training, for losses and inspector scores
    min_difference: float = Field(0.95, gt=0, le=1)  # max cosine similarity of y and y' for an inspector pair
    threshold: float = Field(0.5, gt=0, lt=1)  # squad: align when an inspector scores below this
    seed: int = 0


def aligner_text(question: str, draft: str) -> str:
    """The prompt an aligner continues; its completion is y' followed by [DONE]."""
    return f"{question.strip()} [INIT] {draft.strip()} [ALIGNED]"


def held_out(prompt_id: str, share: float, seed: int) -> bool:
    return random.Random(seed * 7919 + zlib.crc32(prompt_id.encode())).random() < share


def _train_loop(cfg: dict) -> None:
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg["seed"])
    ctx = ray.train.get_context()
    tok = AutoTokenizer.from_pretrained(cfg["base"])
    tok.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg["base"], dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    if cfg["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        new_ids = tok.convert_tokens_to_ids(list(MARKERS))
        model = get_peft_model(model, LoraConfig(r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"], target_modules="all-linear",
                                                 trainable_token_indices={"embed_tokens": new_ids}))
    device = ray.train.torch.get_device()  # a GPU when the worker has one (training/workers.py)
    model = ray.train.torch.prepare_model(model)  # to the device; DDP when world > 1

    def encode(rows):
        ids, labels = [], []
        for r in rows:
            head = tok(aligner_text(r["question"], r["draft"]), add_special_tokens=True)["input_ids"]
            tail = tok(f" {r['corrected'].strip()} [DONE]", add_special_tokens=False)["input_ids"]
            x = (head + tail)[: cfg["max_len"]]
            ids.append(x)
            labels.append(([-100] * len(head) + tail)[: cfg["max_len"]])
        width = max(map(len, ids))
        pad = tok.pad_token_id
        return (torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
                torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
                torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]))

    def loss_on(rows):
        x, y, m = (t.to(device) for t in encode(rows))
        return model(input_ids=x, attention_mask=m, labels=y).loss

    from mote_ray.training.workers import equal_shard

    train = equal_shard(cfg["train"], ctx.get_world_rank(), ctx.get_world_size())  # same steps on every rank
    held = cfg["held"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"])
    model.eval()
    with torch.no_grad():
        held_before = float(loss_on(held)) if held else None
    model.train()
    rng, step, history = random.Random(cfg["seed"]), 0, []
    total = cfg["max_steps"] or cfg["epochs"] * max(1, -(-len(train) // cfg["batch_size"]))
    while step < total:
        order = list(range(len(train)))
        rng.shuffle(order)
        for i in range(0, len(order), cfg["batch_size"]):
            if step >= total:
                break
            loss = loss_on([train[j] for j in order[i:i + cfg["batch_size"]]])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            history.append({"step": step, "loss": float(loss)})
            ray.train.report({"step": step, "loss": float(loss)})
    model.eval()
    with torch.no_grad():
        held_after = float(loss_on(held)) if held else None
    if ctx.get_world_rank() == 0:
        m = model.module if hasattr(model, "module") else model
        if cfg["method"] == "lora":
            m = m.merge_and_unload()
        m.save_pretrained(cfg["out"])
        tok.save_pretrained(cfg["out"])
        Path(cfg["out"], "aligner_metrics.json").write_text(json.dumps({
            "criterion": cfg["criterion"], "method": cfg["method"], "train_rows": len(cfg["train"]),
            "held_out_rows": len(held), "steps": step, "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
            "held_out_loss_before": held_before, "held_out_loss_after": held_after, "history": history}, indent=2))


def train_aligner(config: AlignerTrainConfig, criterion: str, train: list[dict], held: list[dict], out: Path) -> dict:
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from mote_ray.cluster import init_ray
    from mote_ray.models import worker_path
    from mote_ray.training.workers import scaling_config

    init_ray()
    base = worker_path(config.model)
    cols = ("question", "draft", "corrected")
    loop = {**config.model_dump(), "base": base, "criterion": criterion, "out": str(out.resolve()),
            "train": [{k: r[k] for k in cols} for r in train], "held": [{k: r[k] for k in cols} for r in held]}
    TorchTrainer(_train_loop, train_loop_config=loop,
                 scaling_config=scaling_config(config.workers),
                 run_config=RunConfig(storage_path=str(out.resolve().parent / ".ray"), name=f"aligner-{criterion}")).fit()
    return json.loads((out / "aligner_metrics.json").read_text())


def train_inspector(config: AlignerTrainConfig, rows: list[dict]) -> tuple[dict, dict]:
    """(fitted inspector as JSON-able dict, metrics) from one criterion's kept rows."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from mote_ray.eval.refusal import embed

    faulty = [r for r in rows if r["fault"]]
    if not faulty:
        return {}, {"pairs": 0, "reason": "no rows whose critique found a fault"}
    sim = (embed([r["draft"] for r in faulty]) * embed([r["corrected"] for r in faulty])).sum(1)
    pairs = [r for r, s in zip(faulty, sim) if s < config.min_difference]
    if len(pairs) < 4:
        return {}, {"pairs": len(pairs), "reason": f"fewer than 4 pairs differ meaningfully (cosine < {config.min_difference})"}
    # Split by pair: a pair's draft (0) and correction (1) are always on the same side, so the
    # held-out set holds both labels of every held-out pair and AUC is defined.
    held_pairs = np.array([held_out(r["prompt_id"], config.held_out, config.seed) for r in pairs])
    split = "by question"
    if held_pairs.all() or not held_pairs.any():  # too few questions to split by question: every 4th pair
        held_pairs, split = np.arange(len(pairs)) % 4 == 3, "by pair (too few questions)"
    texts, labels = [], []
    for r in pairs:
        for answer, label in ((r["draft"], 0), (r["corrected"], 1)):
            texts.append(inspector_text(r["question"], answer))
            labels.append(label)
    x, y, h = embed(texts), np.array(labels), np.repeat(held_pairs, 2)
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=config.seed).fit(x[~h], y[~h])
    p = clf.predict_proba(x[h])[:, 1]
    metrics = {"pairs": len(pairs), "dropped_similar": len(faulty) - len(pairs), "train_rows": int((~h).sum()),
               "held_out_rows": int(h.sum()), "held_out_split": split,
               "accuracy": float(((p >= 0.5) == y[h]).mean()), "auc": float(roc_auc_score(y[h], p))}
    return {"coef": clf.coef_[0].tolist(), "intercept": float(clf.intercept_[0])}, metrics


def inspector_text(question: str, answer: str) -> str:
    return f"Question: {question.strip()}\nAnswer: {answer.strip()}"


def run_aligner_train(config: AlignerTrainConfig, data_dir: str | Path, out: str | Path) -> dict:
    from mote_ray.aligners.data import read_data
    from mote_ray.cluster import init_ray

    out = Path(out)
    rows = [r for r in read_data(data_dir).to_pylist() if r["kept"]]
    if not rows:
        raise MoteError(f"no kept rows in {data_dir}; see its rejects.jsonl for why")
    init_ray()
    squad = {"criteria": [], "threshold": config.threshold, "aligners": {}, "inspectors": {}, "metrics": {}}
    for criterion in sorted({r["criterion"] for r in rows}):
        mine = [r for r in rows if r["criterion"] == criterion]
        train = [r for r in mine if not held_out(r["prompt_id"], config.held_out, config.seed)]
        held = [r for r in mine if held_out(r["prompt_id"], config.held_out, config.seed)]
        if not train:
            train, held = mine, []
        print(f"mote-ray: aligner {criterion}: {len(train)} train / {len(held)} held-out rows", flush=True)
        a_metrics = train_aligner(config, criterion, train, held, out / "aligners" / criterion)
        inspector, i_metrics = train_inspector(config, mine)
        if not inspector:
            print(f"mote-ray: inspector {criterion}: not trained ({i_metrics['reason']}); the squad skips it", flush=True)
        else:
            (out / "inspectors").mkdir(parents=True, exist_ok=True)
            (out / "inspectors" / f"{criterion}.json").write_text(json.dumps(inspector))
            squad["inspectors"][criterion] = f"inspectors/{criterion}.json"
        squad["criteria"].append(criterion)
        squad["aligners"][criterion] = f"aligners/{criterion}"
        squad["metrics"][criterion] = {"aligner": {k: v for k, v in a_metrics.items() if k != "history"},
                                       "inspector": i_metrics}
    (out / "squad.json").write_text(json.dumps(squad, indent=2))
    return squad
