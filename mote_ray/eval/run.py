"""`mote-ray eval`: suites x models -> DIR/results.json, report.md, report.html (+ PNGs).

Answers are kept per (suite, model) in DIR/responses/<suite>/<model>.jsonl, written when that
model's answers are complete: a killed evaluation resumes where it stopped. Rows that cannot be
used go to DIR/rejects.jsonl with their reasons.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mote_ray import fingerprint
from mote_ray.errors import MoteError


class SuiteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["harmlessness", "jailbreak", "overrefusal", "helpfulness"]
    data: list[str] = Field(min_length=1)
    format: str = "auto"
    column: str | None = None
    limit: int | None = Field(None, ge=1)
    keep_label: str | None = None  # e.g. "safe" for XSTest in the over-refusal suite
    templates: list[str] = Field(default_factory=list)  # jailbreak: template files or folders
    templates_per_prompt: int = Field(4, ge=1)  # the k of goodness@k


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[str] = Field(default_factory=list)  # specs, see responders.ModelSpec
    endpoints: list[str] = Field(default_factory=list)  # OpenAI-compatible base URLs
    suites: list[SuiteConfig] = Field(min_length=1)
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    max_tokens: int = Field(128, ge=1)
    stage_max_tokens: dict[str, int] = Field(default_factory=lambda: {"analysis": 64, "guidance": 64})
    refusal_judge: str | None = None  # a fitted judge JSON; None = the one shipped with mote-ray
    judge_model: str | None = None  # LLM judge on the engine layer
    judge_endpoint: str | None = None  # or an OpenAI-compatible URL
    api_key_env: str | None = None  # bearer key for endpoints
    seed: int = 0


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", label)


def run_eval(config: EvalConfig, out: str | Path, summary: str = "", restart: bool = False) -> dict:
    from mote_ray.eval.refusal import RefusalJudge
    from mote_ray.eval.responders import ModelSpec

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [ModelSpec.parse(m, config.engine) for m in config.models] + [ModelSpec.parse(u) for u in config.endpoints]
    if not specs:
        raise MoteError("nothing to evaluate: give --model and/or --endpoint")
    if len({s.label for s in specs}) != len(specs):
        raise MoteError(f"two models share a label ({[s.label for s in specs]}); name them with label=SPEC")
    api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
    judge = RefusalJudge.load(config.refusal_judge)
    results: dict = {"summary": summary, "suites": {}, "models": [s.__dict__ for s in specs],
                     "refusal_judge": config.refusal_judge or "shipped (fitted on refusal_labels)",
                     "llm_judge": config.judge_model or config.judge_endpoint}
    # All suites' prompts first, then one answering job per model (one engine start per model).
    rows_by_suite = {}
    with open(out / "rejects.jsonl", "w") as rejects_file:
        for suite in config.suites:
            rows_by_suite[suite.name], results["suites"][suite.name] = _suite_rows(suite, config.seed, rejects_file)
    llm = _llm_judge(config, api_key)  # after the data checks: a bad file costs no judge engine start
    try:
        return _answer_score_report(config, out, specs, rows_by_suite, results, judge, llm, api_key, restart)
    finally:
        if llm is not None and llm.engine is not None:
            llm.engine.close()


def _answer_score_report(config, out, specs, rows_by_suite, results, judge, llm, api_key, restart) -> dict:
    """Each model answers what its cache lacks, then every answer is scored and the report written."""
    from mote_ray.eval.report import write_reports
    from mote_ray.eval.responders import answer_groups, respond_group
    from mote_ray.eval.suites import mostly_failed, score

    caches = {s.label: {name: out / "responses" / name / f"{_slug(s.label)}.jsonl" for name in rows_by_suite}
              for s in specs}
    todo = {}
    for spec in specs:  # cached answers are reused only under the settings that produced them
        mine = caches[spec.label]
        fingerprint.check(out / "responses", _answer_fingerprint(config, spec), restart=restart,
                          has_output=any(c.is_file() for c in mine.values()), what=f"answers of {spec.label}",
                          clear=list(mine.values()), file=f"{_slug(spec.label)}.fingerprint.json")
        todo[spec.label] = [r for name, rows in rows_by_suite.items() if not mine[name].is_file() for r in rows]
    limits = {**config.stage_max_tokens, "answer": config.max_tokens}
    for group in answer_groups([s for s in specs if todo[s.label]]):  # one engine start per group
        t0 = time.perf_counter()
        answers = respond_group(group, [todo[s.label] for s in group], max_tokens=config.max_tokens, limits=limits,
                                api_key=api_key)
        print(f"mote-ray eval: {', '.join(s.label for s in group)}: {sum(map(len, answers))} answers in "
              f"{time.perf_counter() - t0:.0f}s", file=sys.stderr)
        for spec, answered in zip(group, answers):
            for name, cache in caches[spec.label].items():
                if not cache.is_file():
                    _write_jsonl(cache, [r for r in answered if r["suite"] == name])
    for spec in specs:
        for name, cache in caches[spec.label].items():
            answered = [json.loads(line) for line in cache.read_text().splitlines()]
            if llm is not None:
                llm.parse_failures.clear()
            results["suites"][name]["models"][spec.label] = score(name, answered, judge, llm)
            _write_jsonl(cache, answered)  # now with the judgements
    failed = mostly_failed(results)
    if failed:  # a safety score over mostly failed requests says nothing: stated first, and non-zero exit
        results["warning"] = ("Most requests failed, so these metrics describe few or no answers: "
                              + "; ".join(failed) + ". See the `error` field in responses/.")
    write_reports(results, out)
    if failed:
        raise EvalMostlyFailed(f"{results['warning']} Report written to {out / 'report.html'}")
    return results


def _suite_rows(suite: SuiteConfig, seed: int, rejects_file) -> tuple[list[dict], dict]:
    """The rows the models answer for one suite and its results entry; rejects go to `rejects_file`."""
    from mote_ray.eval.data import SCORING, load_items, load_templates
    from mote_ray.eval.suites import prompts_for

    items, rejects = load_items(suite.data, suite.format, suite.column, suite.limit, suite.keep_label)
    templates, t_rejects = load_templates(suite.templates) if suite.templates else ([], [])
    for r in rejects + t_rejects:
        rejects_file.write(json.dumps({"suite": suite.name, **r.model_dump()}) + "\n")
    where = f"see {rejects_file.name}"
    if not items:
        raise MoteError(f"suite {suite.name}: no usable prompts in {suite.data} ({len(rejects)} rejected; {where})")
    if suite.templates and not templates:
        why = "; ".join(sorted({r.reason for r in t_rejects})[:2]) or "no template files"
        raise MoteError(f"suite {suite.name}: no usable jailbreak template in {suite.templates} ({why}; {where})")
    rows = prompts_for(suite.name, items, templates, suite.templates_per_prompt, seed)
    if not rows:  # nothing would be answered, and scoring would read answers never written
        raise MoteError(f"suite {suite.name}: no prompts to answer ({len(items)} prompts, {len(templates)} templates)")
    entry = {"data": suite.data, "items": len(items), "rows": len(rows), "rejects": len(rejects) + len(t_rejects),
             "scoring": SCORING.get(suite.format), "models": {}}
    return [{**r, "id": f"{suite.name}:{r['id']}", "suite": suite.name} for r in rows], entry


class EvalMostlyFailed(MoteError):
    """The evaluation finished and its report is written, but most requests failed."""


def _answer_fingerprint(config: EvalConfig, spec) -> dict:
    """What determines a model's cached answers: the model (a local one by its files' content), the
    answering settings, and each suite's prompts (their files' content too)."""
    from mote_ray.fingerprint import content_identity, model_identity

    model = dict(spec.__dict__)
    local = Path(spec.target) if spec.kind != "endpoint" and spec.target else None
    if local and local.exists():  # by content, not location: a moved copy keeps its answers
        model.update(target=None, **model_identity(str(local)))
    fields = {"data", "format", "column", "limit", "keep_label", "templates", "templates_per_prompt"}
    return {"model": model,
            "engine": config.engine, "max_tokens": config.max_tokens, "stage_max_tokens": config.stage_max_tokens,
            "seed": config.seed,
            "suites": {s.name: {**s.model_dump(include=fields), "content": content_identity(s.data + s.templates)}
                       for s in config.suites}}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    os.replace(tmp, path)  # complete or absent: what resuming relies on


def _llm_judge(config: EvalConfig, api_key: str | None):
    from mote_ray.eval.llm_judge import LLMJudge

    if config.judge_endpoint:
        return LLMJudge(endpoint=config.judge_endpoint, api_key=api_key)
    if config.judge_model:
        from mote_ray.config import EngineConfig
        from mote_ray.engines import create_engine

        return LLMJudge(engine=create_engine(EngineConfig(model=config.judge_model, engine=config.engine)))
    return None
