"""Every shipped config loads and validates without building an engine."""

from pathlib import Path

import pytest

from mote_ray.config import load_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))
LOADERS = {"generate": "mote_ray.generation:GenerateConfig", "train": "mote_ray.training.run:TrainConfig",
           "pipeline": "mote_ray.pipeline:PipelineConfig", "eval": "mote_ray.eval.run:EvalConfig"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_validates(path):
    import importlib

    module, cls = LOADERS[path.stem].split(":")
    config = getattr(importlib.import_module(module), cls)(**load_yaml(path))
    # Every value the file sets reaches the config (none dropped or defaulted over).
    _assert_carries(load_yaml(path), config.model_dump())
    assert path.read_text().startswith("# mote-ray ")  # headed by the command that runs it


def _assert_carries(given, got, where="config"):
    if isinstance(given, dict):
        for k, v in given.items():
            _assert_carries(v, got[k], f"{where}.{k}")
    elif isinstance(given, list) and given and isinstance(given[0], dict):
        assert len(given) == len(got), where
        for i, (a, b) in enumerate(zip(given, got)):
            _assert_carries(a, b, f"{where}[{i}]")
    else:
        assert got == given, where


SERVE_YAML = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"


def test_serve_config_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    from mote_ray.serving.config import ServeConfig

    data = load_yaml(SERVE_YAML)
    schema = ServeDeploySchema(**data)
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app" and app.args["path"] in ("exact", "lora")
    assert {d.name for d in app.deployments} <= {"Router", "ExactExpert", "LoraExpert"}
    assert all(d.autoscaling_config for d in app.deployments)
    # Its args: are a ServeConfig, every value carried (none dropped or defaulted over).
    _assert_carries(app.args, ServeConfig.model_validate(app.args).model_dump(), "args")


@pytest.mark.parametrize("change,field,needle", [
    ({"timeout": 60}, "timeout", "Extra inputs are not permitted"),  # timeout_s misspelt: once silently ignored
    ({"max_inflight": "lots"}, "max_inflight", "valid integer"),  # once a crash at the first request
    ({"timeout_s": 0}, "timeout_s", "greater than 0"),
    ({"path": "fast"}, "path", "the multi-LoRA path is now `lora`"),
    ({"model": None}, "model", "valid string"),
])
def test_serve_app_refuses_a_typo_or_bad_arg_at_build_naming_it(change, field, needle):
    """`serve run serve/config.yaml` with one arg wrong: the build fails on it, before any model is
    read, both where Serve validates `args` into build_app's ServeConfig and where a caller passes a dict."""
    from pydantic import ValidationError
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # what serve run calls

    from serve.app import build_app

    args = {**load_yaml(SERVE_YAML)["applications"][0]["args"], **change}
    for call in (lambda: call_user_app_builder_with_args_if_necessary(build_app, args), lambda: build_app(args)):
        with pytest.raises(ValidationError) as e:
            call()
        (err,) = e.value.errors()
        assert err["loc"] == (field,) and needle in err["msg"] and err["input"] == change[field]
        assert f"input_value={change[field]!r}" in str(e.value)  # the message shows the bad value


def test_a_serve_config_cannot_claim_loopback_to_skip_the_key():
    """serve/config.yaml listens on 0.0.0.0: `loopback_only: true` there would serve with no key."""
    from serve.app import build_app

    args = {**load_yaml(SERVE_YAML)["applications"][0]["args"], "api_key_env": None, "loopback_only": True}
    with pytest.raises(ValueError, match="loopback_only is set by `mote-ray serve`"):
        build_app(args)


def test_stage_budgets_over_the_context_are_refused_on_load_naming_the_numbers():
    from pydantic import ValidationError

    from mote_ray.generation import GenerateConfig
    from mote_ray.pipeline import PipelineConfig

    # What jobs/configs/pipeline.yaml shipped: 256/256/512 budgets against max_model_len 512.
    with pytest.raises(ValidationError, match=r"engine.max_model_len=512.*max_tokens.analysis 256 .*max_tokens.answer "
                                              r"512 = 1120 tokens.*Lower some of these by 608"):
        PipelineConfig(generate={"max_tokens": {"analysis": 256, "guidance": 256, "answer": 512, "check": 8}})
    with pytest.raises(ValidationError, match="eval_max_tokens 512"):
        PipelineConfig(eval_max_tokens=512)
    with pytest.raises(ValidationError, match=r"missing \['check'\]"):
        GenerateConfig(max_tokens={"analysis": 8, "guidance": 8, "answer": 8})
    # The same budgets fit once the context is raised.
    GenerateConfig(engine={"max_model_len": 2048}, max_tokens={"analysis": 256, "guidance": 256, "answer": 512, "check": 8})


def test_the_longest_chain_fits_the_context_as_measured_with_the_models_own_templates(tiny_model):
    """A chain whose texts all use their budgets must leave its answer the whole answer budget; the
    job-start check measures the templates, and refuses (naming the numbers) what would not fit."""
    from mote_ray.chat import encode, load_tokenizer
    from mote_ray.errors import MoteError
    from mote_ray.generation import GenerateConfig, check_context
    from mote_ray.models import resolve_model
    from mote_ray.records import GenerationRequest
    from mote_ray.stages import Stage

    here = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    for model in (None, tiny_model):  # the offline default (byte-level: one token per character) and a real one
        tok = load_tokenizer(resolve_model(model))
        for shipped in (GenerateConfig(), GenerateConfig(**load_yaml(here / "generate.yaml")),
                        GenerateConfig(**load_yaml(here / "pipeline.yaml")["generate"])):
            need = check_context(shipped, tok)
            assert max(need.values()) <= shipped.engine.max_model_len
        # The shipped YAMLs are sized for a real model's context; on a 512-position model they are refused.
        with pytest.raises(MoteError, match=r"engine.max_model_len=2048 is longer than this model's context \(512"):
            check_context(GenerateConfig(**load_yaml(here / "generate.yaml")), tok, 512)
    from mote_ray.chains import ChainBuilder, turn_overhead
    from mote_ray.records import SamplingParams
    from mote_ray.stages import Templates

    from .fakes import ScriptedEngine

    tok, cfg = load_tokenizer(resolve_model(None)), GenerateConfig()
    m = cfg.max_tokens
    full = (lambda n: ("word " * n)[:n])  # n tokens for the byte-level tokenizer
    # The longest history the builder keeps: here two turns whose texts and markers use the whole budget.
    each = cfg.history_tokens // 2 - turn_overhead(tok)
    history = [{"role": "user", "content": full(each)}, {"role": "assistant", "content": full(each)}]
    builder = ChainBuilder(ScriptedEngine(tok, {}), Templates(), m, SamplingParams(), cfg.question_tokens,
                           cfg.history_tokens)
    assert builder._clip_history(history) == history
    msgs = cfg.templates.messages(Stage.ANSWER, history, full(cfg.question_tokens), full(m["analysis"]),
                                  full(m["guidance"]))
    longest = len(encode(tok, GenerationRequest(messages=msgs)))
    assert longest + m["answer"] <= check_context(cfg, tok)["answer"] <= cfg.engine.max_model_len
    # What the old defaults asked (96/96/128, question 128, history 64) cannot fit: refused at start.
    old = GenerateConfig(max_tokens={"analysis": 96, "guidance": 96, "answer": 128, "check": 8}, question_tokens=128,
                         history_tokens=64)
    with pytest.raises(MoteError, match=r"the answer stage's prompt and budget do not fit engine.max_model_len=512"
                                        r".*template text \d+ \+ history 64 \+ question 128 .*Lower"):
        check_context(old, tok)
