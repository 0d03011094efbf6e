"""`mote-ray anchored dpo`: DPO on anchored (or rank) pairs with TRL's DPOTrainer inside Ray Train.

The reference model is the fine-tuned model the pairs were sampled from, never silently the raw
base: a `mote-ray train` one-LoRA output (sft / lora-chain) has its adapter merged into its base
first; a plain model directory or hub id is its own reference. The policy is that reference plus a
fresh LoRA, so TRL computes reference log-probs with the adapter disabled — at step 0 policy ==
reference and the loss is log 2 per pair. β = 0.1 by default.

    OUT/reference/      the merged reference model (when one was merged)
    OUT/adapter/        the trained DPO LoRA (PEFT format) on the reference
    OUT/dpo_metrics.json  step-0 loss, held-out reward margin and accuracy before and after, history
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mote_ray.errors import MoteError


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
    seed: int = 0


def reference_model(model: str, out: Path) -> str:
    """The reference as a plain model directory: merge a one-LoRA training output, else use as is."""
    from mote_ray.models import worker_path

    p = Path(model)
    if (p / "adapters" / "default" / "adapter_config.json").is_file() and (p / "base").is_dir():
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(p / "base"),
                                           str(p / "adapters" / "default")).merge_and_unload()
        merged.save_pretrained(out / "reference")
        AutoTokenizer.from_pretrained(p / "base").save_pretrained(out / "reference")
        return str(out / "reference")
    if (p / "mote").is_dir():
        raise MoteError(f"{model} is a MoTE model (several experts): DPO here trains a one-adapter policy; "
                        "give the model the pairs were sampled from as a plain directory or an sft output")
    return worker_path(model)


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
    import ray.train
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(cfg["seed"])
    tok = AutoTokenizer.from_pretrained(cfg["reference"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg["reference"], dtype=torch.float32)
    args = DPOConfig(output_dir=cfg["out"] + "/trainer", beta=cfg["beta"], learning_rate=cfg["lr"],
                     num_train_epochs=cfg["epochs"], max_steps=cfg["max_steps"],
                     per_device_train_batch_size=cfg["batch_size"], per_device_eval_batch_size=cfg["batch_size"],
                     max_length=cfg["max_length"], logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=not torch.cuda.is_available(), seed=cfg["seed"], dataset_num_proc=None,
                     disable_tqdm=ray.train.get_context().get_world_rank() != 0)
    trainer = DPOTrainer(model=model, ref_model=None, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(cfg["train"]), eval_dataset=Dataset.from_list(cfg["held"]) if cfg["held"] else None,
                         peft_config=LoraConfig(r=cfg["r"], lora_alpha=2 * cfg["r"], target_modules="all-linear",
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
    trainer.add_callback(RayTrainReportCallback())
    trainer = prepare_trainer(trainer)
    no_eval = {"eval_loss": None}  # no held-out pairs: say so, never fall back to training pairs
    before = trainer.evaluate() if cfg["held"] else no_eval
    trainer.train()
    after = trainer.evaluate() if cfg["held"] else no_eval
    if ray.train.get_context().get_world_rank() == 0:
        trainer.model.save_pretrained(cfg["out"] + "/adapter")
        history = [h for h in trainer.state.log_history if "loss" in h]
        Path(cfg["out"], "dpo_metrics.json").write_text(json.dumps({
            "kind": cfg["kind"], "beta": cfg["beta"], "reference": cfg["reference"], "train_pairs": len(cfg["train"]),
            "held_out_pairs": len(cfg["held"]), "step0_loss": before["eval_loss"],
            "margin_before": before.get("eval_rewards/margins"), "margin_after": after.get("eval_rewards/margins"),
            "accuracy_before": before.get("eval_rewards/accuracies"),
            "accuracy_after": after.get("eval_rewards/accuracies"), "eval_loss_after": after["eval_loss"],
            "history": history}, indent=2))


def run_dpo(config: DPOJobConfig, pairs_dir: str | Path, out: str | Path) -> dict:
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from mote_ray.cluster import init_ray
    from mote_ray.training.workers import scaling_config

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, held = _read_pairs(Path(pairs_dir), config.kind)
    reference = reference_model(config.model, out)
    init_ray()
    loop_cfg = {**config.model_dump(), "reference": reference, "out": str(out), "train": train, "held": held}
    TorchTrainer(_train_loop, train_loop_config=loop_cfg,
                 scaling_config=scaling_config(config.workers),
                 run_config=RunConfig(storage_path=str(out / "ray"), name="dpo")).fit()
    return json.loads((out / "dpo_metrics.json").read_text())
