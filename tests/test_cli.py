"""The `mote-ray` command as a user runs it (subprocess, real engines)."""

import json
import os
import subprocess
import sys

import pytest


def mote(*args, timeout=300):
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, "-m", "mote_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.ray
def test_info_prints_json(tiny_model):
    p = mote("info", "--model", tiny_model, "--engine", "transformers")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["engine"]["name"] == "transformers" and info["model"]["path"] == tiny_model
    assert info["ray"]["resources"]["CPU"] >= 1 and "torch" in info["versions"]


@pytest.mark.parametrize("args,needle", [
    (["info", "--model", "/nonexistent/model"], "model not found: /nonexistent/model"),
    (["generate-text", "--engine", "vllm", "--model", "{tiny}"], "head_dim"),
    (["generate-text", "--temperature", "-1"], "temperature"),
    (["generate-text", "--top-p", "2"], "top_p"),
    (["generate-text", "--adapter", "noequals"], "NAME=DIR"),
])
def test_user_errors_are_one_line_without_traceback(args, needle, tiny_model):
    p = mote(*[a.replace("{tiny}", tiny_model) for a in args])
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and needle in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("mote-ray: error:")


def test_generate_text_prints_text(tiny_model):
    p = mote("generate-text", "--model", tiny_model, "--engine", "transformers", "--max-tokens", "12", "--json",
             "Once upon a time")
    assert p.returncode == 0, p.stderr
    [row] = [json.loads(line) for line in p.stdout.splitlines()]
    assert row["text"].startswith(", there was") and row["completion_tokens"] == 12
