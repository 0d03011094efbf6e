"""`mote-ray pipeline`: generate -> train -> evaluate (base vs MoTE), resumable by stage.

    OUT/generate/   AlignCoT chains (the generation job; resumes per prompt)
    OUT/train/      the MoTE model (the training job; resumes from its checkpoint)
    OUT/train-sft/  the one-LoRA SFT baseline on the same chains (answers only), likewise
    OUT/            results.json, report.md, report.html + PNGs (the evaluation; resumes per model)

A stage that finished leaves OUT/<stage>.done and is skipped on a rerun. OUT/fingerprint.json records
what determines the outputs (the config, the base model's and the prompt files' content, the resolved
engine); a rerun under a different one is refused, naming what changed, unless `restart` (`--restart`)
clears the pipeline's outputs in OUT. With no prompts given, the prompt sets shipped in mote_ray/data/
are used (harmful requests and benign-but-risky ones, written for this project): the first part of
each set is generated on, the rest is held out for evaluation.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DATA = Path(__file__).with_name("data")
HARMFUL, BENIGN = DATA / "prompts_harmful.jsonl", DATA / "prompts_benign_risky.jsonl"


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None  # base model; None = $MOTE_MODEL or the offline default
    engine: str = "auto"
    harmful: list[str] = Field(default_factory=lambda: [str(HARMFUL)])  # prompt files
    benign: list[str] = Field(default_factory=lambda: [str(BENIGN)])
    held_out: float = Field(0.3, gt=0, lt=1)  # share of each prompt set kept for evaluation
    generate: dict = Field(default_factory=dict)  # GenerateConfig fields
    train: dict = Field(default_factory=lambda: {"max_steps": 30, "batch_size": 8, "lr": 5e-3, "workers": 2})  # TrainConfig fields
    modes: list[str] = Field(default_factory=lambda: ["adaptive", "direct"])  # MoTE inference modes to evaluate
    # One-LoRA baselines trained on the same chains and evaluated beside MoTE (the paper's SFT: answers only).
    baselines: list[Literal["sft", "lora-chain"]] = Field(default_factory=lambda: ["sft"])
    eval_max_tokens: int = Field(96, ge=1)

    @model_validator(mode="after")
    def _budgets_fit_the_context(self) -> PipelineConfig:
        """Token budgets are checked against the context length here, on load, not hours into a run."""
        from mote_ray.config import EngineConfig
        from mote_ray.eval.run import EvalConfig
        from mote_ray.generation import GenerateConfig

        try:
            GenerateConfig(**self.generate)
        except ValidationError as e:
            raise ValueError(f"generate: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        ctx = EngineConfig().max_model_len  # the evaluation's engines use the default context
        stages = EvalConfig.model_fields["stage_max_tokens"].default_factory()
        need = self.eval_max_tokens + stages["analysis"] + stages["guidance"]
        if need >= ctx:
            raise ValueError(f"eval_max_tokens {self.eval_max_tokens} + the evaluation's analysis and guidance budgets "
                             f"({stages['analysis']} + {stages['guidance']}) leave no room for a question in the "
                             f"evaluation engines' context ({ctx} tokens); lower eval_max_tokens below "
                             f"{ctx - stages['analysis'] - stages['guidance']}")
        return self


# What a pipeline writes into OUT, removed by `restart` (nothing else in OUT is touched).
_OUTPUTS = ("generate", "train", "train-sft", "train-lora-chain", "responses", "results.json", "rejects.jsonl",
            "report.md", "report.html", "prompts-generate.jsonl", "prompts-eval-harmful.jsonl",
            "prompts-eval-benign.jsonl")


def run_pipeline(config: PipelineConfig, out: str | Path, restart: bool = False) -> dict:
    from mote_ray import fingerprint
    from mote_ray.eval.run import EvalConfig, SuiteConfig, run_eval
    from mote_ray.generation import GenerateConfig, output_fingerprint, run_generate
    from mote_ray.inputs import read_prompts
    from mote_ray.models import DEFAULT_MODEL_NAME, resolve_model
    from mote_ray.training.run import TrainConfig, run_train

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base = resolve_model(config.model).path  # the offline default is built here, once
    gen_cfg = GenerateConfig(**{**config.generate, "engine": {**config.generate.get("engine", {}),
                                                                "model": base, "engine": config.engine}})
    fingerprint.check(out, {"config": config.model_dump(exclude={"model"}), "generate": output_fingerprint(gen_cfg),
                            "prompts": fingerprint.content_identity(config.harmful + config.benign)},
                      has_output=any(out.glob("*.done")), restart=restart, what="the pipeline's output",
                      clear=[out / n for n in _OUTPUTS] + list(out.glob("*.done")) + list(out.glob("*.png")))

    # Split each prompt set: generation on the first part, evaluation on the held-out rest.
    splits = {}
    for name, files in (("harmful", config.harmful), ("benign", config.benign)):
        rows, _ = read_prompts(files)
        cut = max(1, int(len(rows) * (1 - config.held_out)))
        splits[name] = (rows[:cut], rows[cut:])
    gen_file, eval_files = out / "prompts-generate.jsonl", {}
    _write_prompts(gen_file, splits["harmful"][0] + splits["benign"][0], dialogue=True)
    for name in splits:  # evaluation is single-turn: the last user turn
        eval_files[name] = out / f"prompts-eval-{name}.jsonl"
        _write_prompts(eval_files[name], splits[name][1], dialogue=False)

    def stage(name, fn):
        done = out / f"{name}.done"
        if done.is_file():
            print(f"mote-ray pipeline: {name}: done earlier ({done}), skipped", file=sys.stderr)
            return json.loads(done.read_text())
        print(f"mote-ray pipeline: {name} ...", file=sys.stderr)
        t0 = time.perf_counter()
        info = {"seconds": None, **(fn() or {})}
        info["seconds"] = round(time.perf_counter() - t0, 1)
        done.write_text(json.dumps(info, default=str))
        return info

    gen = stage("generate", lambda: run_generate(gen_cfg, [str(gen_file)], out / "generate", progress=True))
    train_fields = dict(config.train)
    if Path(base).name == DEFAULT_MODEL_NAME and "include_flagged" not in train_fields:
        # The offline default writes noise, so every self-check is unparseable and every chain flagged;
        # training on them anyway is what shows the mechanics end to end.
        train_fields["include_flagged"] = True
        print("mote-ray pipeline: offline default model: training on flagged chains too (its self-checks are noise)",
              file=sys.stderr)
    # restart reaches training too: its checkpoints may live in a storage_path outside OUT.
    train = stage("train", lambda: run_train(TrainConfig(**{**train_fields, "model": base}), out / "generate",
                                             out / "train", restart=restart))
    for method in config.baselines:
        stage(f"train-{method}", lambda m=method: run_train(
            TrainConfig(**{**train_fields, "model": base, "method": m}), out / "generate", out / f"train-{m}",
            restart=restart))
    models = ([f"base={base}"] + [f"{m}={out / f'train-{m}'}" for m in config.baselines]
              + [f"mote-{m}={out / 'train'}@{m}" for m in config.modes])
    ev_cfg = EvalConfig(models=models, engine=config.engine, max_tokens=config.eval_max_tokens, suites=[
        SuiteConfig(name="harmlessness", data=[str(eval_files["harmful"])]),
        SuiteConfig(name="overrefusal", data=[str(eval_files["benign"])])])
    summary = (f"Base model {base}; {gen.get('total', '?')} AlignCoT chains generated, MoTE trained "
               f"{train.get('steps', '?')} steps; evaluated on held-out prompts with the offline refusal judge.")
    if Path(base).name == DEFAULT_MODEL_NAME:
        summary += (" The offline default model has random weights and writes noise, which the judge counts "
                    "as off-topic (a refusal): these numbers show the mechanics, not alignment.")
    stage("eval", lambda: {"suites": list(run_eval(ev_cfg, out, summary)["suites"])})
    from mote_ray.eval.report import fmt

    results = json.loads((out / "results.json").read_text())
    lines = [f"mote-ray pipeline: finished in {time.perf_counter() - t_start:.0f}s"]
    for suite, entry in results["suites"].items():
        for model, res in entry["models"].items():
            ms = ", ".join(f"{k} {fmt(v['value'])}" for k, v in res["metrics"].items())
            lines.append(f"  {suite:13s} {model:16s} {ms}")
    lines.append(f"report: {out / 'report.html'}")
    print("\n".join(lines), file=sys.stderr)
    return {"report": str(out / "report.html"), "generate": gen, "train": train}


def _write_prompts(path: Path, rows, dialogue: bool) -> None:
    def record(r):
        if not dialogue:
            return {"prompt": r.question}
        return {"messages": [*(m.model_dump() for m in r.history), {"role": "user", "content": r.question}]}

    path.write_text("".join(json.dumps(record(r)) + "\n" for r in rows))
