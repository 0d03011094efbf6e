"""`mote-ray anchored dpo`: DPO on anchored (or rank) pairs with TRL's DPOTrainer inside Ray Train.

The reference model is the fine-tuned model the pairs were sampled from, never silently the raw
base: a `mote-ray train` one-LoRA output (sft / lora-chain) has its adapter merged into its base
first; a plain model directory or hub id is its own reference. The policy is that reference plus a
fresh LoRA, so TRL computes reference log-probs with the adapter disabled — at step 0 policy ==
reference and the loss is log 2 per pair. β = 0.1 by default.

Trained inside Ray Train with the conventions of training/conventions.py: workers sized by one
rule, the run in `storage_path`, rank 0's outputs handed back as the run's checkpoint and copied
into OUT by the driver, MLflow from rank 0. The reference is merged on the workers, not by the
driver (the model itself must be readable on every node: a shared path or a hub id).

    OUT/reference/      the merged reference model (when one was merged)
    OUT/adapter/        the trained DPO LoRA (PEFT format) on the reference
    OUT/dpo_metrics.json  step-0 loss, held-out reward margin and accuracy before and after, history
    OUT/ray/dpo-<hash of OUT>/ the Ray Train run and its checkpoint (storage_path: elsewhere)
    OUT/mlruns/         MLflow file store (tracking.mlflow: default)
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mote_ray.errors import MoteError
from mote_ray.training.conventions import absolute_storage_path
from mote_ray.training.tracking import TrackingConfig


class DPOJobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str  # the fine-tuned model the pairs were sampled from
    kind: Literal["anchor", "rank"] = "anchor"
    beta: float = Field(0.1, gt=0)
    lr: float = Field(5e-4, gt=0)
    epochs: int = Field(1, ge=1)
    max_steps: int = Field(-1, ge=-1)  # -1: epochs decide
    batch_size: int = Field(4, ge=1)
    r: int = Field(8, ge=1)
    max_length: int = Field(384, ge=32)
    workers: int = Field(1, ge=1)
    # Where the Ray Train run (its checkpoint) goes: a local path or a cloud URI; None = OUT/ray.
    storage_path: str | None = None
    use_gpu: bool | None = None  # None: GPU workers when the cluster has a GPU for each
    _storage_path = field_validator("storage_path")(lambda v: absolute_storage_path(v))
    tracking: TrackingConfig = TrackingConfig()  # MLflow (default: OUT/mlruns) and W&B when configured
    seed: int = 0


def is_one_lora_run(model: str) -> bool:
    p = Path(model)
    return (p / "adapters" / "default" / "adapter_config.json").is_file() and (p / "base").is_dir()


def check_reference(model: str) -> str:
    """The reference as workers open it: a one-LoRA training output (merged on the workers) or a
    plain model directory or hub id; a MoTE model is refused."""
    from mote_ray.models import worker_path

    if is_one_lora_run(model):
        return str(Path(model).resolve())
    if (Path(model) / "mote").is_dir():
        raise MoteError(f"{model} is a MoTE model (several experts): DPO here trains a one-adapter policy; "
                        "give the model the pairs were sampled from as a plain directory or an sft output")
    return worker_path(model)


def load_reference(model: str):
    """(reference model, tokenizer): a one-LoRA training output has its adapter merged into its base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_one_lora_run(model):
        from peft import PeftModel

        p = Path(model)
        base = AutoModelForCausalLM.from_pretrained(p / "base", dtype=torch.float32)
        return (PeftModel.from_pretrained(base, str(p / "adapters" / "default")).merge_and_unload(),
                AutoTokenizer.from_pretrained(p / "base"))
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), AutoTokenizer.from_pretrained(model)


def _read_pairs(pairs_dir: Path, kind: str) -> tuple[list[dict], list[dict]]:
    f = pairs_dir / "pairs.jsonl"
    if not f.is_file():
        raise MoteError(f"no pairs.jsonl in {pairs_dir}; run `mote-ray anchored pairs` first")
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected", "split")} for r in rows if r["kind"] == kind]
    train = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] == "held_out"]
    if not held and len({r["prompt"] for r in train}) >= 2:
        # No held-out pairs in the file: hold out whole prompts (every 5th by a stable hash) and do
        # not train on them, so the reported margin is never a training-set number.
        def out(r):
            return zlib.crc32(r["prompt"].encode()) % 5 == 0

        held, train = [r for r in train if out(r)], [r for r in train if not out(r)]
        if not held or not train:  # the hash put every prompt on one side: hold out the first prompt
            everything = held + train
            first = everything[0]["prompt"]
            held = [r for r in everything if r["prompt"] == first]
            train = [r for r in everything if r["prompt"] != first]
    if not train:
        raise MoteError(f"no {kind} training pairs in {f}")
    return train, held


def _train_loop(cfg: dict) -> None:
    import tempfile

    import ray.train
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from ray.train.huggingface.transformers import prepare_trainer
    from trl import DPOConfig, DPOTrainer

    from mote_ray.training.conventions import (mlflow_info, precision_args, report_outputs, start_tracker,
                                               tracking_callback)

    torch.manual_seed(cfg["seed"])
    rank = ray.train.get_context().get_world_rank()
    tracker = start_tracker(cfg, params={k: cfg[k] for k in ("kind", "beta", "lr", "epochs", "max_steps",
                                                             "batch_size", "r", "workers", "model")})
    reference, tok = load_reference(cfg["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # HF Trainer's DistributedSampler (through accelerate) gives every rank the same number of
    # batches, padding the last one, so DDP ranks never wait on each other.
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="dpo-"), beta=cfg["beta"], learning_rate=cfg["lr"],
                     num_train_epochs=cfg["epochs"], max_steps=cfg["max_steps"],
                     per_device_train_batch_size=cfg["batch_size"], per_device_eval_batch_size=cfg["batch_size"],
                     max_length=cfg["max_length"], logging_steps=1, save_strategy="no", report_to=[],
                     seed=cfg["seed"], dataset_num_proc=None, disable_tqdm=rank != 0,
                     **precision_args(cfg["use_gpu"]))
    trainer = DPOTrainer(model=reference, ref_model=None, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(cfg["train"]), eval_dataset=Dataset.from_list(cfg["held"]) if cfg["held"] else None,
                         peft_config=LoraConfig(r=cfg["r"], lora_alpha=2 * cfg["r"], target_modules="all-linear",
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
    trainer.add_callback(tracking_callback(tracker))
    trainer = prepare_trainer(trainer)
    no_eval = {"eval_loss": None}  # no held-out pairs: say so, never fall back to training pairs
    before = trainer.evaluate() if cfg["held"] else no_eval
    trainer.train()
    after = trainer.evaluate() if cfg["held"] else no_eval
    metrics = {
        "kind": cfg["kind"], "beta": cfg["beta"], "reference": cfg["reference_label"], "train_pairs": len(cfg["train"]),
        "held_out_pairs": len(cfg["held"]), "workers": ray.train.get_context().get_world_size(),
        "steps": trainer.state.global_step, "step0_loss": before["eval_loss"],
        "margin_before": before.get("eval_rewards/margins"), "margin_after": after.get("eval_rewards/margins"),
        "accuracy_before": before.get("eval_rewards/accuracies"),
        "accuracy_after": after.get("eval_rewards/accuracies"), "eval_loss_after": after["eval_loss"],
        "mlflow": mlflow_info(tracker, cfg), "history": [h for h in trainer.state.log_history if "loss" in h]}
    tracker.finish()

    def write(d: Path) -> None:
        trainer.model.save_pretrained(d / "adapter")
        if is_one_lora_run(cfg["model"]):  # the merged reference the adapter sits on (LoRA layers removed)
            trainer.model.unload().save_pretrained(d / "reference")
            tok.save_pretrained(d / "reference")
        (d / "dpo_metrics.json").write_text(json.dumps(metrics, indent=2))

    report_outputs(metrics, write)


def run_dpo(config: DPOJobConfig, pairs_dir: str | Path, out: str | Path) -> dict:
    from mote_ray.cluster import init_ray
    from mote_ray.training.conventions import fit_and_collect

    out = Path(out).resolve()
    train, held = _read_pairs(Path(pairs_dir), config.kind)
    model = check_reference(config.model)
    # Where evaluation finds the reference: the merged copy the run hands back, or the model itself.
    label = str(out / "reference") if is_one_lora_run(model) else model
    init_ray()
    loop_cfg = {**config.model_dump(exclude={"tracking", "storage_path", "use_gpu"}), "model": model,
                "reference_label": label, "train": train, "held": held}
    fit_and_collect(_train_loop, loop_cfg, workers=config.workers, name="dpo", storage_path=config.storage_path,
                    tracking=config.tracking, root=out, use_gpu=config.use_gpu)
    return json.loads((out / "dpo_metrics.json").read_text())
