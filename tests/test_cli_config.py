"""The command line is generated from the configs: a YAML file, a flag and a `--set` override reach the
same validated config in one way, with the stated precedence (defaults < --config < flags < --set).
Parsing only: nothing here starts Ray or an engine."""

from pathlib import Path

import pytest
import yaml

from mote_ray.cli import main, parse
from mote_ray.config import EngineConfig
from mote_ray.eval.run import EvalConfig
from mote_ray.generation import GenerateConfig
from mote_ray.pipeline import PipelineConfig
from mote_ray.training.run import TrainConfig


def config_for(argv, cls):
    return parse(argv).layers(cls)


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


TRAIN = ["train", "--chains", "c", "--out", "o"]
GEN = ["generate", "--prompts", "p.csv", "--out", "o"]


@pytest.mark.parametrize("cmd,cls,yaml_data,flag,override", [
    (TRAIN, TrainConfig, {"max_steps": 7}, ["--max-steps", "7"], "max_steps=7"),
    (TRAIN, TrainConfig, {"method": "sft"}, ["--method", "sft"], "method=sft"),
    (TRAIN, TrainConfig, {"include_flagged": True}, ["--include-flagged"], "include_flagged=true"),
    (GEN, GenerateConfig, {"engine": {"max_model_len": 1024}}, ["--max-model-len", "1024"],
     "engine.max_model_len=1024"),
    (GEN, GenerateConfig, {"pool": {"size": 3}}, ["--workers", "3"], "pool.size=3"),
    (GEN, GenerateConfig, {"policy": "drop"}, ["--policy", "drop"], "policy=drop"),
    (["pipeline", "--out", "o"], PipelineConfig, {"model": "m"}, ["--model", "m"], "model=m"),
])
def test_yaml_flag_and_set_give_the_same_config(tmp_path, cmd, cls, yaml_data, flag, override):
    by_yaml = config_for([*cmd, "--config", write(tmp_path, yaml_data)], cls)
    by_flag = config_for([*cmd, *flag], cls)
    by_set = config_for([*cmd, "--set", override], cls)
    assert by_yaml == by_flag == by_set
    assert by_flag != cls(), "the setting must differ from the default, or this proves nothing"


def test_precedence_defaults_then_yaml_then_flags_then_set(tmp_path):
    cfg = write(tmp_path, {"max_steps": 3, "lr": 0.01})
    assert config_for([*TRAIN, "--config", cfg], TrainConfig).max_steps == 3
    both = config_for([*TRAIN, "--config", cfg, "--max-steps", "5"], TrainConfig)
    assert both.max_steps == 5 and both.lr == 0.01  # the flag wins its field only; the YAML keeps the others
    assert config_for([*TRAIN, "--config", cfg, "--max-steps", "5", "--set", "max_steps=9"], TrainConfig).max_steps == 9
    assert config_for([*TRAIN, "--set", "max_steps=9", "--max-steps", "5"], TrainConfig).max_steps == 9  # not by order
    assert config_for(TRAIN, TrainConfig).max_steps is None  # the config class's default


def test_a_flag_left_out_does_not_override_the_yaml(tmp_path):
    cfg = write(tmp_path, {"engine": {"engine": "transformers", "device": "cpu"}, "pool": {"batch_size": 4}})
    config = config_for([*GEN, "--config", cfg], GenerateConfig)
    assert (config.engine.engine, config.engine.device, config.pool.batch_size) == ("transformers", "cpu", 4)


def test_every_scalar_train_config_field_is_a_flag():
    """A field added to TrainConfig becomes a `mote-ray train` flag with no CLI change."""
    from mote_ray.commands.base import _scalar

    scalars = {n for n, f in TrainConfig.model_fields.items() if _scalar(f.annotation)}
    assert {"model", "workers", "max_steps", "epochs", "method", "lr", "batch_size", "dtype"} <= scalars
    flags = parse([*TRAIN]).flags  # bound method, checks the model exists
    assert flags() == {}
    for name in scalars:
        value = {"method": "sft", "dtype": "bf16", "schedule": "linear"}.get(name)
        annotation = TrainConfig.model_fields[name].annotation
        if value is None:
            value = "true" if bool in (annotation, *getattr(annotation, "__args__", ())) else "2"
        flag = f"--{name.replace('_', '-')}"
        argv = [*TRAIN, flag] if value == "true" else [*TRAIN, flag, value]
        assert name in parse(argv).flags(), name


def test_list_values_keep_commas():
    """pydantic-settings would split list items at commas; a file name or a YAML mapping may hold one."""
    cmd = parse(["generate", "--prompts", "a,b.csv", "c.jsonl", "--out", "o",
                 "--set", "max_tokens={analysis: 10, guidance: 10, answer: 10, check: 4}"])
    assert cmd.prompts == ["a,b.csv", "c.jsonl"]
    assert cmd.layers(GenerateConfig).max_tokens == {"analysis": 10, "guidance": 10, "answer": 10, "check": 4}
    assert parse(["generate-text", "Hello, world", "--max-tokens", "3"]).prompts == ["Hello, world"]


def test_eval_model_endpoint_and_suite_flags_add_to_the_yaml(tmp_path):
    cfg = write(tmp_path, {"models": ["a=m1"], "suites": [{"name": "harmlessness", "data": ["h.csv"]}],
                           "max_tokens": 32})
    config = config_for(["eval", "--config", cfg, "--model", "b=m2", "--endpoint", "http://x/v1", "--suite",
                         "overrefusal", "--data", "o.csv", "--format", "xstest", "--max-tokens", "16", "--out", "o"],
                        EvalConfig)
    assert config.models == ["a=m1", "b=m2"] and config.endpoints == ["http://x/v1"]
    assert [(s.name, s.data, s.format) for s in config.suites] == [("harmlessness", ["h.csv"], "auto"),
                                                                  ("overrefusal", ["o.csv"], "xstest")]
    assert config.max_tokens == 16


# The command lines of the README, jobs/, deploy/ and the acceptance checks, with what they must set.
@pytest.mark.parametrize("argv,expect", [
    (["info", "--model", "M", "--engine", "vllm"], {"model": "M", "engine": "vllm"}),
    (["generate", "--model", "M", "--engine", "vllm", "--prompts", "a.csv", "b.jsonl", "c.jsonl.gz", "--out", "o"],
     {"prompts": ["a.csv", "b.jsonl", "c.jsonl.gz"], "engine": "vllm"}),
    (["train", "--model", "M", "--chains", "g", "--out", "r", "--workers", "2", "--max-steps", "30"],
     {"workers": 2, "max_steps": 30}),
    (["serve", "--model", "W", "--path", "exact", "--port", "8123", "--api-key-env", "K"],
     {"port": 8123, "api_key_env": "K", "path": "exact"}),
    (["chat", "--model", "runs/mote", "--mode", "full", "How do I pick a lock?"],
     {"prompt": "How do I pick a lock?", "mode": "full"}),
    (["aligners", "data", "--model", "M", "--prompts", "a.csv", "--criteria", "ethical,factual,helpful", "--out", "d"],
     {"criteria": "ethical,factual,helpful", "prompts": ["a.csv"]}),
    (["aligners", "train", "--data", "d", "--model", "M", "--out", "s"], {"model": "M"}),
    (["aligners", "serve", "--squad", "s", "--upstream", "http://u/v1", "--port", "8100"], {"port": 8100}),
    (["anchored", "pairs", "--model", "M", "--data", "d.jsonl", "--format", "openbookqa", "--n", "3", "--out", "p"],
     {"n": 3}),
    (["anchored", "dpo", "--pairs", "p", "--model", "M", "--kind", "rank", "--out", "o"], {"kind": "rank"}),
    (["anchored", "eval", "--model", "base=M", "--model", "rank=R", "--data", "d", "--format", "arc", "--out", "o"],
     {"model": ["base=M", "rank=R"]}),
    (["eval", "--endpoint", "http://h:8000/v1", "--suite", "jailbreak", "--data", "a.csv", "--templates", "plain",
      "t/", "--out", "o"], {"templates": ["plain", "t/"]}),
    (["generate-text", "--ray", "--chat", "--model", "Q", "--json", "Hi"], {"ray": True, "chat": True, "as_json": True}),
    (["judge-fit", "--data", "a.csv", "b.csv", "--out", "j.json"], {"data": ["a.csv", "b.csv"]}),
    (["pipeline", "--out", "runs/pipeline"], {"out": "runs/pipeline"}),
    (["top", "--url", "http://a/metrics", "--url", "http://b/metrics", "--count", "1"],
     {"url": ["http://a/metrics", "http://b/metrics"], "count": 1}),
])
def test_documented_command_lines_parse(argv, expect):
    cmd = parse(argv)
    assert {k: getattr(cmd, k) for k in expect} == expect


@pytest.mark.parametrize("argv", [
    [*TRAIN, "--bogus", "1"], ["generate-text", "--no-such-flag"], ["anchored", "pairs", "--data", "d", "--format",
                                                                    "arc", "--out", "o", "--typo"],
])
def test_unknown_flags_exit_2_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "unrecognized arguments: " + argv[-2 if argv[-1] == "1" else -1] in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    ([*TRAIN, "--max-steps", "abc"], "--max-steps (max_steps): Input should be a valid integer"),
    ([*TRAIN, "--max-steps", "0"], "max_steps: Input should be greater than or equal to 1"),
    ([*TRAIN, "--set", "mote.rr=3"], "mote.rr: Extra inputs are not permitted"),
    ([*TRAIN, "--set", "novalue"], "override must look like a.b=value"),
    ([*GEN, "--engine", "foo"], "--engine (engine): Input should be 'auto', 'vllm' or 'transformers'"),
    ([*GEN, "--max-model-len", "64"], "stage budgets do not fit engine.max_model_len=64"),
    (["anchored", "dpo", "--pairs", "p", "--out", "o"], "model: Field required"),
    (["anchored"], "needs a command: pairs, dpo, eval"),
    # a scalar where a dotted path descends: one line, not a ValueError/TypeError traceback
    ([*TRAIN, "--set", "mote=8", "--set", "mote.r=4"], "mote.r: mote holds int 8, not a mapping of fields"),
    # suite flags without --suite would be silently ignored
    (["eval", "--model", "m", "--format", "advbench", "--limit", "3", "--out", "o"],
     "--format, --limit need --suite NAME"),
])
def test_invalid_values_are_one_line_naming_the_field(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.strip().startswith("mote-ray: error:")


def test_help_is_readable_for_every_command(capsys):
    from mote_ray.commands.app import COMMANDS

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f"    {name} " in out for name in COMMANDS)
    for argv in [[c] for c in COMMANDS if c not in ("anchored", "aligners")] + [
            ["anchored", s] for s in ("pairs", "dpo", "eval")] + [["aligners", s] for s in ("data", "train", "apply",
                                                                                            "serve")]:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(f"usage: mote-ray {' '.join(argv)}"), argv
        assert "PydanticUndefined" not in out and "(default: None)" not in out and "list[str]" not in out, argv


def test_engine_flags_build_the_engine_config():
    cmd = parse(["info", "--model", "M", "--engine", "transformers", "--max-model-len", "256"])
    assert cmd.layers(EngineConfig) == EngineConfig(model="M", engine="transformers", max_model_len=256)


# `mote-ray serve`: its flags are ServeConfig's fields, the `args:` of serve/config.yaml.
SERVE_YAML = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"
# A non-default value for every ServeConfig field a flag sets, with that flag (a new field must be added here).
SERVE_FIELDS = {"path": ("lora", ["--path", "lora"]), "engine": ("vllm", ["--engine", "vllm"]),
                "compile": (False, ["--no-compile"]), "replicas": (2, ["--replicas", "2"]),
                "expert_cpus": (0.5, ["--expert-cpus", "0.5"]), "api_key_env": ("K", ["--api-key-env", "K"]),
                "api_keys_file": ("/k", ["--api-keys-file", "/k"]), "insecure": (True, ["--insecure"]),
                "max_prompt_tokens": (100, ["--max-prompt-tokens", "100"]), "timeout_s": (60, ["--timeout", "60"]),
                "max_inflight": (8, ["--max-inflight", "8"]), "name": ("m", ["--name", "m"])}


def test_serve_flags_are_generated_from_serve_config(capsys):
    """`--help` of both Serve commands lists their config's fields as flags (and only these, plus the
    command's own --port, --host, --address), with the config's descriptions and defaults."""
    import re

    from mote_ray.serving.config import ProxyConfig, ServeConfig

    for argv, cls in [(["serve"], ServeConfig), (["aligners", "serve"], ProxyConfig)]:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        out = capsys.readouterr().out
        usage = out.split("\n\n")[0]
        fields = {"--timeout" if n == "timeout_s" else f"--{n.replace('_', '-')}" for n in cls.model_fields
                  if n != "loopback_only"}  # --host decides loopback_only
        flags = {f for f in re.findall(r"(?<![\w-])--[a-z][a-z-]*", usage) if not f.startswith("--no-")}
        assert flags == fields | {"--port", "--host", "--address"}, argv
        letters = re.sub(r"\W", "", out)  # argparse wraps lines, breaking words at hyphens
        for name, field in cls.model_fields.items():
            if name != "loopback_only":
                assert re.sub(r"\W", "", field.description) in letters, name
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(then 429) (default: 64)" in out and "aborted after it (default: 120.0)" in out
    assert "--compile, --no-compile" in out and "--model MODEL a `mote-ray train` output directory (required)" in out


@pytest.mark.parametrize("field", sorted(SERVE_FIELDS))
def test_serve_flag_and_yaml_arg_give_the_same_serve_config(field):
    from mote_ray.serving.config import ServeConfig

    value, flags = SERVE_FIELDS[field]
    by_flag = parse(["serve", "--model", "runs/mote", *flags]).layers(ServeConfig)
    by_yaml = ServeConfig.model_validate({"model": "runs/mote", field: value})
    assert by_flag == by_yaml and by_flag != ServeConfig(model="runs/mote")


def test_every_serve_config_field_is_a_flag_or_set_by_host():
    from mote_ray.serving.config import ServeConfig

    assert set(ServeConfig.model_fields) == {"model", "loopback_only", *SERVE_FIELDS}


def test_shipped_serve_yaml_and_its_command_line_give_the_same_serve_config(capsys):
    """serve/config.yaml's args and the `mote-ray serve` line that says the same (its 0.0.0.0 included)."""
    from mote_ray.config import load_yaml
    from mote_ray.serving.config import ServeConfig

    args = load_yaml(SERVE_YAML)["applications"][0]["args"]
    cmd = parse(["serve", "--host", "0.0.0.0", "--model", "runs/mote", "--path", "exact", "--engine", "auto",
                 "--compile", "--api-key-env", "MOTE_API_KEY", "--no-insecure", "--max-prompt-tokens", "384",
                 "--timeout", "120", "--max-inflight", "64"])
    assert cmd.serve_config() == ServeConfig.model_validate(args)
    # Without a key on loopback, the command sets what the YAML (listening on 0.0.0.0) cannot.
    local = parse(["serve", "--model", "runs/mote"]).serve_config()
    assert local == ServeConfig(model="runs/mote", loopback_only=True)
    assert "listening on loopback only" in capsys.readouterr().err


def test_aligners_serve_flags_give_the_proxy_config():
    from mote_ray.serving.config import ProxyConfig

    cmd = parse(["aligners", "serve", "--squad", "s", "--upstream", "http://u/v1", "--timeout", "5", "--engine",
                 "vllm", "--upstream-key-env", "U"])
    assert cmd.layers(ProxyConfig) == ProxyConfig(squad="s", upstream="http://u/v1", timeout_s=5, engine="vllm",
                                                  upstream_key_env="U")


@pytest.mark.parametrize("argv,needle", [
    (["--max-inflight", "lots"], "--max-inflight (max_inflight): Input should be a valid integer"),
    (["--timeout", "0"], "timeout_s: Input should be greater than 0 (got 0.0)"),
    (["--replicas", "0"], "replicas: Input should be greater than or equal to 1 (got 0)"),
    (["--path", "fast"], "--path (path): Input should be 'exact' or 'lora' (got 'fast')"),
])
def test_serve_bad_flag_values_exit_2_naming_the_field(argv, needle, capsys):
    assert main(["serve", "--model", "runs/mote", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
