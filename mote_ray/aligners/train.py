"""`mote-ray aligners train`: one aligner model and one inspector per criterion -> a squad directory.

Aligner: a small causal LM fine-tuned (full, or LoRA merged afterwards) with TRL's SFTTrainer on
prompt-completion rows, prompt `x [INIT] y [ALIGNED]`, completion `y' [DONE]`, the loss on the
completion only; the three markers are added as special tokens, so `[DONE]` is one token both
engines stop on (`stop_token_ids`), never the first period. Trained inside Ray Train with the
conventions of training/conventions.py (worker sizing, storage_path, outputs through the run's
checkpoint, MLflow from rank 0).
Inspector: P(aligned | x, y), a logistic regression on the all-MiniLM-L6-v2 embedding of the pair,
trained on y (label 0) vs y' (label 1) from rows whose critique found a fault and whose y and y'
differ meaningfully (embedding cosine similarity below `min_difference`, default 0.95); accuracy
and AUC on held-out questions.

    OUT/squad.json                  criteria, threshold, paths, metrics
    OUT/aligners/<criterion>/       a plain model directory (both engines load it) + aligner_metrics.json
    OUT/inspectors/<criterion>.json the fitted inspector
    OUT/ray/aligner-<criterion>-<hash of OUT>/ the Ray Train run and its checkpoint (storage_path: elsewhere)
    OUT/mlruns/                     MLflow file store (tracking.mlflow: default), one run per aligner
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mote_ray.errors import MoteError
from mote_ray.training.conventions import absolute_storage_path
from mote_ray.training.tracking import TrackingConfig

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
    # Where the Ray Train runs (the aligners' checkpoints) go: a local path or a cloud URI; None = OUT/ray.
    storage_path: str | None = None
    use_gpu: bool | None = None  # None: GPU workers when the cluster has a GPU for each
    _storage_path = field_validator("storage_path")(lambda v: absolute_storage_path(v))
    tracking: TrackingConfig = TrackingConfig()  # MLflow (default: OUT/mlruns, one run per aligner), W&B when set
    seed: int = 0


def aligner_text(question: str, draft: str) -> str:
    """The prompt an aligner continues; its completion is y' followed by [DONE]."""
    return f"{question.strip()} [INIT] {draft.strip()} [ALIGNED]"


def held_out(prompt_id: str, share: float, seed: int) -> bool:
    return random.Random(seed * 7919 + zlib.crc32(prompt_id.encode())).random() < share


def completion_rows(rows: list[dict]) -> list[dict]:
    """TRL prompt-completion rows: the prompt is x [INIT] y [ALIGNED], the completion y' [DONE]."""
    return [{"prompt": aligner_text(r["question"], r["draft"]), "completion": f" {r['corrected'].strip()} [DONE]"}
            for r in rows]


def fitting_rows(base: str, rows: list[dict], max_len: int) -> tuple[list[dict], int]:
    """The rows whose prompt + completion fit `max_len` tokens, and how many did not. TRL would cut a
    longer row from the end — its completion losing `[DONE]`, teaching the aligner not to stop — or
    drop it without a word when the whole completion is cut; here they are counted and said."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    keep = [r for r, c in zip(rows, completion_rows(rows))
            if len(tok(c["prompt"])["input_ids"]) + len(tok(c["completion"], add_special_tokens=False)["input_ids"])
            <= max_len]
    return keep, len(rows) - len(keep)


def sft_trainer(cfg: dict, train: list[dict], held: list[dict], output_dir: str, rank: int = 0):
    """TRL's SFTTrainer for one aligner: the markers added as special tokens (embeddings resized),
    the loss on the completion only (TRL's default for prompt-completion rows: labels are -100 on
    the prompt), and `[DONE]` as the EOS, so TRL appends nothing after a completion that already ends
    with it (with the tokenizer's own EOS it would append `</s>` after `[DONE]`)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from mote_ray.training.conventions import precision_args

    tok = AutoTokenizer.from_pretrained(cfg["base"])
    tok.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # set before TRL makes [DONE] the EOS: padding stays </s>
    model = AutoModelForCausalLM.from_pretrained(cfg["base"], dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    peft = None
    if cfg["method"] == "lora":
        from peft import LoraConfig

        # The new marker rows train too (PEFT keeps them beside the frozen embedding; merged on save).
        # With untied embeddings `all-linear` leaves lm_head out, so [DONE]'s logit row would stay
        # random: lm_head then trains whole (`modules_to_save`). Not trainable_token_indices there:
        # TRL's fused LM head reads `lm_head.weight` directly and would skip PEFT's row deltas.
        untied = model.get_output_embeddings().weight is not model.get_input_embeddings().weight
        peft = LoraConfig(r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"], target_modules="all-linear",
                          lora_dropout=0.0, task_type="CAUSAL_LM",
                          modules_to_save=["lm_head"] if untied else None,
                          trainable_token_indices={"embed_tokens": tok.convert_tokens_to_ids(list(MARKERS))})
    args = SFTConfig(output_dir=output_dir, learning_rate=cfg["lr"], lr_scheduler_type="constant",
                     num_train_epochs=cfg["epochs"], max_steps=cfg["max_steps"] or -1,
                     per_device_train_batch_size=cfg["batch_size"], per_device_eval_batch_size=cfg["batch_size"],
                     max_length=cfg["max_len"], eos_token="[DONE]", completion_only_loss=True,
                     gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[],
                     seed=cfg["seed"], dataset_num_proc=None, disable_tqdm=rank != 0,
                     **precision_args(cfg.get("use_gpu")))
    return SFTTrainer(model=model, args=args, processing_class=tok, peft_config=peft,
                      train_dataset=Dataset.from_list(completion_rows(train)),
                      eval_dataset=Dataset.from_list(completion_rows(held)) if held else None)


def _train_loop(cfg: dict) -> None:
    """One aligner on every Ray Train worker. HF Trainer's DistributedSampler (through accelerate)
    splits the rows evenly and pads the last batch, so every rank runs the same number of steps
    (DDP's collectives would hang otherwise)."""
    import tempfile

    import ray.train
    import torch
    from ray.train.huggingface.transformers import prepare_trainer

    from mote_ray.training.conventions import mlflow_info, report_outputs, start_tracker, tracking_callback

    torch.manual_seed(cfg["seed"])
    ctx = ray.train.get_context()
    tracker = start_tracker(cfg, params={k: cfg[k] for k in ("criterion", "method", "lr", "batch_size", "epochs",
                                                             "max_steps", "lora_r", "workers", "base")})
    scratch = tempfile.mkdtemp(prefix="aligner-")  # the trainer's own output_dir, on the worker
    trainer = sft_trainer(cfg, cfg["train"], cfg["held"], scratch, ctx.get_world_rank())
    trainer.add_callback(tracking_callback(tracker))
    trainer = prepare_trainer(trainer)
    held = bool(cfg["held"])
    before = trainer.evaluate()["eval_loss"] if held else None  # no held-out rows: None, never training rows
    trainer.train()
    after = trainer.evaluate()["eval_loss"] if held else None
    history = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    steps = [trainer.state.global_step]
    if torch.distributed.is_initialized():  # every rank's step count, so a test can see they are equal
        steps = [None] * ctx.get_world_size()
        torch.distributed.all_gather_object(steps, trainer.state.global_step)
    metrics = {"criterion": cfg["criterion"], "method": cfg["method"], "train_rows": len(cfg["train"]),
               "held_out_rows": len(cfg["held"]), "workers": ctx.get_world_size(), "steps": trainer.state.global_step,
               "steps_per_rank": steps,
               "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
               "held_out_loss_before": before, "held_out_loss_after": after,
               "mlflow": mlflow_info(tracker, cfg), "history": history}
    tracker.log({k: v for k, v in metrics.items() if k.startswith("held_out_loss") and v is not None},
                trainer.state.global_step)
    tracker.finish()

    def write(d: Path) -> None:
        model = trainer.model.merge_and_unload() if cfg["method"] == "lora" else trainer.model
        model.save_pretrained(d)
        trainer.processing_class.save_pretrained(d)
        (d / "aligner_metrics.json").write_text(json.dumps(metrics, indent=2))

    report_outputs(metrics, write)


def train_aligner(config: AlignerTrainConfig, criterion: str, train: list[dict], held: list[dict], squad: Path) -> dict:
    """One aligner into squad/aligners/<criterion> (model directory + aligner_metrics.json), copied
    from the run's checkpoint; the runs go to storage_path (default squad/ray), MLflow to squad/mlruns."""
    from mote_ray.cluster import init_ray
    from mote_ray.models import worker_path
    from mote_ray.training.conventions import fit_and_collect

    init_ray()
    base = worker_path(config.model)
    train, over_train = fitting_rows(base, train, config.max_len)
    held, over_held = fitting_rows(base, held, config.max_len)
    if over_train or over_held:
        print(f"mote-ray: aligner {criterion}: {over_train} training and {over_held} held-out rows are longer "
              f"than max_len={config.max_len} tokens: not trained on (raise max_len to keep them)", flush=True)
    if not train:
        raise MoteError(f"aligner {criterion}: no training row fits max_len={config.max_len} tokens; raise max_len")
    cols = ("question", "draft", "corrected")
    loop = {**config.model_dump(exclude={"tracking", "storage_path", "use_gpu"}),
            "base": base,
            "criterion": criterion, "train": [{k: r[k] for k in cols} for r in train],
            "held": [{k: r[k] for k in cols} for r in held]}
    out = Path(squad) / "aligners" / criterion
    fit_and_collect(_train_loop, loop, workers=config.workers, name=f"aligner-{criterion}",
                    storage_path=config.storage_path, tracking=config.tracking, root=Path(squad), out=out,
                    use_gpu=config.use_gpu)
    metrics = json.loads((out / "aligner_metrics.json").read_text())
    metrics["not_trained_on"] = {f"train_over_max_len_{config.max_len}": over_train,
                                 f"held_out_over_max_len_{config.max_len}": over_held}
    (out / "aligner_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


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
        a_metrics = train_aligner(config, criterion, train, held, out)
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
