"""`mote-ray eval`: evaluate models/endpoints on suites -> results.json + report.md/.html with plots."""

from __future__ import annotations

import sys
from typing import Literal

from pydantic import Field
from pydantic_settings import CliImplicitFlag, CliVariadicArg

from mote_ray.commands.base import RESTART_HELP, Command, config_flags, extend, set_field
from mote_ray.eval.run import EvalConfig, SuiteConfig


class _Eval(Command):
    """Evaluate models/endpoints on a suite: results.json + report.md/.html with plots.

    --model, --endpoint and --suite add to what --config lists; the other flags override it."""

    model: list[str] = Field(default_factory=list, description="[label=]PATH_OR_ID, `default`, or a `mote-ray "
                             "train` output with @adaptive|direct|analysis|full (repeat to compare side by side)")
    endpoint: list[str] = Field(default_factory=list, description="[label=]an OpenAI-compatible base URL (e.g. "
                                                                  "http://host:8000/v1); repeatable")
    suite: Literal["harmlessness", "jailbreak", "overrefusal", "helpfulness"] | None = None
    data: CliVariadicArg[list[str]] = Field(default_factory=list, description="prompt files (CSV, JSON, JSONL, "
                                                                              "Parquet; .txt: a prompt per line)")
    format: str = Field("auto", description="advbench, harmbench, jailbreakbench, xstest, strongreject, "
                        "do-not-answer, tdc2023, alpacaeval, alpaca, or auto (column detection)")
    column: str | None = Field(None, description="the prompt column, when the format does not name it")
    keep_label: str | None = Field(None, description="keep rows with this label only (XSTest over-refusal: safe)")
    templates: CliVariadicArg[list[str]] = Field(
        default_factory=list, description="jailbreak templates: files or folders; `plain` = the prompt unwrapped "
                                          "(no-jailbreak baseline)")
    templates_per_prompt: int = Field(4, ge=1, description="the k of goodness@k")
    limit: int | None = Field(None, ge=1, description="first N usable prompts")
    config: str | None = Field(None, description="YAML EvalConfig (models, suites, ...); flags add to it")
    set: list[str] = set_field("EvalConfig", "stage_max_tokens.analysis=32")
    out: str
    restart: CliImplicitFlag[bool] = Field(False, description=RESTART_HELP)

    def layers(self, config_cls=EvalConfig, **extra):
        """--model, --endpoint and --suite add to the lists in --config; then the usual layers."""
        from mote_ray.config import load_yaml
        from mote_ray.errors import MoteError

        listed = load_yaml(self.config) if self.config else {}
        adds = {"models": list(listed.get("models") or []) + self.model,
                "endpoints": list(listed.get("endpoints") or []) + self.endpoint}
        if self.suite:
            if not self.data:
                raise MoteError("--suite needs --data FILE...")
            suite = SuiteConfig(name=self.suite, data=self.data, format=self.format, column=self.column,
                                limit=self.limit, keep_label=self.keep_label, templates=self.templates,
                                templates_per_prompt=self.templates_per_prompt)
            adds["suites"] = list(listed.get("suites") or []) + [suite.model_dump()]
        else:  # suite flags without a suite would be silently ignored
            given = [f"--{name.replace('_', '-')}" for name in ("data", "format", "column", "limit", "keep_label",
                                                                "templates", "templates_per_prompt")
                     if name in self.model_fields_set]
            if given:
                raise MoteError(f"{', '.join(given)} need --suite NAME (which suite they are for)")
        return super().layers(config_cls, **adds, **extra)

    def run(self) -> int:
        from mote_ray.eval.report import fmt
        from mote_ray.eval.run import run_eval

        config = self.layers()
        results = run_eval(config, self.out, restart=self.restart)
        for name, entry in results["suites"].items():
            for model, res in entry["models"].items():  # a metric with nothing scored prints "no data"
                values = ", ".join(f"{k} {fmt(v['value'])}" for k, v in res["metrics"].items())
                print(f"{name:13s} {model:24s} {values}")
        print(f"mote-ray: report in {self.out}/report.html (results.json, report.md)", file=sys.stderr)
        return 0


Eval = extend(_Eval, config_flags(EvalConfig, help={
    "engine": "engine for --model", "max_tokens": "per answer",
    "judge_model": "LLM judge on the engine layer (harmfulness, StrongREJECT, helpfulness)",
    "judge_endpoint": "LLM judge behind an OpenAI-compatible URL",
    "refusal_judge": "a fitted refusal judge JSON (default: the shipped one)",
    "api_key_env": "env var holding the bearer key for endpoints"}))
