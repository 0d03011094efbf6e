"""The Serve app as a user runs it: `mote-ray serve` + the official openai client over loopback HTTP."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from mote_ray.training.run import TrainConfig, run_train

from .fakes import write_format_chains

pytestmark = pytest.mark.ray
KEY = "test-key-123"


@pytest.fixture(scope="module")
def trained(ray_local, tiny_model, tmp_path_factory):
    """A tiny MoTE model trained on format-only chains by the real training job."""
    d = tmp_path_factory.mktemp("serve-model")
    write_format_chains(d / "gen", 16)
    run_train(TrainConfig(model=tiny_model, max_steps=30, batch_size=8, lr=1e-2, checkpoint_every=30,
                          mote={"r": 8, "p_skip": 0.0}), d / "gen", d / "run")
    ray_local.shutdown()  # the server starts its own Ray
    return d / "run"


@pytest.fixture(scope="module")
def server(trained):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_ADDRESS": "", "MOTE_TEST_KEY": KEY}
    p = subprocess.Popen([sys.executable, "-m", "mote_ray.cli", "serve", "--model", str(trained), "--port", str(port),
                          "--api-key-env", "MOTE_TEST_KEY", "--max-prompt-tokens", "200"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(base + "/readyz", timeout=2)
            break
        except OSError:  # not up yet (refused, reset, timed out, 404 before the app is deployed)
            time.sleep(1)
            if p.poll() is not None:
                pytest.fail(p.stdout.read()[-3000:])
    yield base
    os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
    assert KEY not in (p.stdout.read() or "")  # the key is never logged


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=KEY)


def test_openai_client_completion_stream_and_stages(client):
    model = client.models.list().data[0].id
    msgs = [{"role": "user", "content": "Question 7?"}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=12,
                                       extra_body={"mote": {"return_stages": True, "mode": "full"}})
    d = r.model_dump()
    assert list(d["mote"]["stages"]) == ["analysis", "guidance", "answer"]
    assert r.choices[0].message.content == d["mote"]["stages"]["answer"]
    plain = client.chat.completions.create(model=model, messages=msgs, max_tokens=12)
    assert "mote" not in plain.model_dump() or plain.model_dump()["mote"] is None
    chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=12, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) > 2 and text == plain.choices[0].message.content  # greedy: stream == non-stream


@pytest.mark.parametrize("mode,stages", [("direct", ["answer"]), ("analysis", ["analysis", "answer"]),
                                         ("full", ["analysis", "guidance", "answer"])])
def test_forced_modes_produce_their_stages(client, mode, stages):
    r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=8,
                                       messages=[{"role": "user", "content": "Question 3?"}],
                                       extra_body={"mote": {"return_stages": True, "mode": mode,
                                                            "stage_max_tokens": {"analysis": 8, "guidance": 8}}})
    assert r.model_dump()["mote"]["stages_used"] == stages


def _post(server, body: bytes, key: str | None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(server + "/v1/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_and_auth_over_http(server, client):
    model = client.models.list().data[0].id
    good = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    cases = {
        "no_key": (good, None, 401), "bad_key": (good, "wrong", 401), "bad_json": (b"{not json", KEY, 400),
        "bad_type": (json.dumps({"model": model, "messages": "x"}).encode(), KEY, 422),
        "empty": (json.dumps({"model": model, "messages": []}).encode(), KEY, 422),
        "unknown_model": (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(), KEY, 404),
        "too_long": (json.dumps({"model": model, "messages": [{"role": "user", "content": "word " * 400}]}).encode(), KEY, 413),
    }
    for name, (body, key, want) in cases.items():
        status, payload = _post(server, body, key)
        assert status == want, (name, status, payload)
        assert payload["error"]["message"], name
    assert _post(server, good, KEY)[0] == 200
