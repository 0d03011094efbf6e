"""The Serve app as a user runs it: `mote-ray serve` + the official openai client over loopback HTTP."""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from mote_ray.serving.local import LocalServer

from .conftest import SHARED, copy_model

pytestmark = pytest.mark.ray
KEY = "test-key-123"


@pytest.fixture(scope="module")
def trained(ray_local, format_mote_dir, tmp_path_factory):
    """The session's tiny MoTE model (conftest.format_mote_dir), copied: the servers read and may write it."""
    run = copy_model(format_mote_dir, tmp_path_factory.mktemp("serve-model") / "run")
    ray_local.shutdown()  # each server starts its own Ray
    return run


@pytest.fixture(scope="module")
def server(trained):
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="mr-")  # short: Ray's socket paths must fit in 107 bytes
    with LocalServer(["--model", str(trained), "--api-key-env", "MOTE_TEST_KEY", "--max-prompt-tokens", "200"],
                     env={"MOTE_TEST_KEY": KEY, "RAY_TMPDIR": ray_tmp}) as srv:
        yield srv.base_url
    # The key is in no log of the run: the server's output and every file Ray's session wrote.
    assert KEY not in srv.output()
    leaks = []
    for path in __import__("pathlib").Path(ray_tmp).rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if KEY.encode() in path.read_bytes():
                    leaks.append(str(path))
            except OSError:
                pass
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leaks, leaks


def _reference(trained, prompts, mode, limits):
    from mote_ray.chat import encode
    from mote_ray.mote.export import load_mote
    from mote_ray.mote.generate import MoTEGenerator
    from mote_ray.records import GenerationRequest

    model, tok = load_mote(trained)
    gen = MoTEGenerator(model, tok)
    return [gen.generate(encode(tok, GenerationRequest(messages=[{"role": "user", "content": p}])), mode=mode,
                         limits=limits).token_ids for p in prompts]


def _token_ids(client, prompt, mode, limits):
    r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=limits["answer"],
                                       messages=[{"role": "user", "content": prompt}],
                                       extra_body={"mote": {"return_stages": True, "mode": mode,
                                                            "stage_max_tokens": limits, "max_tokens_scope": "answer"}})
    return r.model_dump()["mote"]["token_ids"]


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=KEY)


def test_openai_client_completion_stream_and_stages(client):
    model = client.models.list().data[0].id
    msgs = [{"role": "user", "content": "Question 7?"}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=40,
                                       extra_body={"mote": {"return_stages": True, "mode": "full",
                                                            "stage_max_tokens": {"analysis": 8, "guidance": 8}}})
    d = r.model_dump()
    assert list(d["mote"]["stages"]) == ["analysis", "guidance", "answer"]
    assert r.choices[0].message.content == d["mote"]["stages"]["answer"]
    plain = client.chat.completions.create(model=model, messages=msgs, max_tokens=40)
    assert "mote" not in plain.model_dump() or plain.model_dump()["mote"] is None
    chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=40, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) > 2 and text == plain.choices[0].message.content  # greedy: stream == non-stream


@pytest.mark.parametrize("mode,stages", [("direct", ["answer"]), ("analysis", ["analysis", "answer"]),
                                         ("full", ["analysis", "guidance", "answer"])])
def test_forced_modes_produce_their_stages(client, mode, stages):
    r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=40,
                                       messages=[{"role": "user", "content": "Question 3?"}],
                                       extra_body={"mote": {"return_stages": True, "mode": mode,
                                                            "stage_max_tokens": {"analysis": 8, "guidance": 8}}})
    assert r.model_dump()["mote"]["stages_used"] == stages


def _post(server, body: bytes, key: str | None, timeout: float = 60):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(server + "/v1/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_and_auth_over_http(server, client):
    model = client.models.list().data[0].id
    good = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    cases = {
        "no_key": (good, None, 401), "bad_key": (good, "wrong", 401), "bad_json": (b"{not json", KEY, 400),
        "bad_type": (json.dumps({"model": model, "messages": "x"}).encode(), KEY, 400),
        "empty": (json.dumps({"model": model, "messages": []}).encode(), KEY, 400),
        "unsupported": (json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}], "n": 2}).encode(),
                        KEY, 400),
        "huge": (b'{"model": "x", "pad": "' + b"x" * (2 << 20) + b'"}', KEY, 413),
        "unknown_model": (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(), KEY, 404),
        "too_long": (json.dumps({"model": model, "messages": [{"role": "user", "content": "word " * 400}]}).encode(), KEY, 400),
    }
    for name, (body, key, want) in cases.items():
        status, payload = _post(server, body, key)
        assert status == want, (name, status, payload)
        assert payload["error"]["message"], name
    assert _post(server, good, KEY)[0] == 200


def test_exact_path_equals_reference_generator_token_for_token(server, client, trained):
    """The default server: the vLLM MoTE model compiled (torch.compile on CPU), 16 chains in flight
    at once (mixed prefill and decode steps), token for token the transformers reference."""
    from concurrent.futures import ThreadPoolExecutor

    assert {k: v for k, v in _engine_stats(server, KEY).items() if k in ("engine", "compiled")} == \
        {"engine": "vllm", "compiled": True}
    prompts = [f"Question {i}? Tell me about item {i * 7}." for i in range(16)]
    limits = {"analysis": 24, "guidance": 24, "answer": 32}
    with ThreadPoolExecutor(16) as pool:
        served = list(pool.map(lambda p: _token_ids(client, p, "adaptive", limits), prompts))
    assert served == _reference(trained, prompts, "adaptive", limits)


def test_lora_path_serves_stages_and_direct_mode_is_exact(trained):
    from openai import OpenAI

    with LocalServer(["--model", str(trained), "--path", "lora", "--replicas", "1"]) as srv:
        client = OpenAI(base_url=srv.base_url + "/v1", api_key="none")
        limits = {"analysis": 8, "guidance": 8, "answer": 12}
        for mode, stages in [("direct", ["answer"]), ("analysis", ["analysis", "answer"]),
                             ("full", ["analysis", "guidance", "answer"])]:
            r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=12,
                                               messages=[{"role": "user", "content": "Question 3?"}],
                                               extra_body={"mote": {"return_stages": True, "mode": mode,
                                                                    "stage_max_tokens": limits,
                                                                    "max_tokens_scope": "answer"}})
            assert r.model_dump()["mote"]["stages_used"] == stages
            assert r.choices[0].message.content == r.model_dump()["mote"]["stages"]["answer"]
        chunks = list(client.chat.completions.create(model=client.models.list().data[0].id, stream=True, max_tokens=12,
                                                     messages=[{"role": "user", "content": "Question 3?"}],
                                                     extra_body={"mote": {"mode": "direct", "max_tokens_scope": "answer"}}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks)
        # Direct mode reads the prompt with the answer expert on both paths: the same greedy tokens.
        prompts = [f"Question {i}?" for i in range(4)]
        assert [_token_ids(client, p, "direct", limits) for p in prompts] == _reference(trained, prompts, "direct", limits)
        assert "LoraExpert engine: lora/" in srv.output()


def _engine_stats(base_url, key=None):
    req = urllib.request.Request(base_url + "/mote/engine", headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _wait_engine(base_url, want_aborted, seconds):
    deadline, stats = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        stats = _engine_stats(base_url)
        if stats["unfinished_requests"] == 0 and stats["aborted_requests"] >= want_aborted:
            break
        time.sleep(0.2)
    return stats


def test_disconnect_and_timeout_abort_the_engine_request(random_mote_dir, tmp_path):
    """A client that leaves mid-stream, and then a request that hits its timeout, each leave the vLLM
    engine holding no request, counted as aborted. A copy of the random model that cannot end a stage
    (below) on a 4,096-token context writes 3,600-token chains, several times what this engine writes
    in the 2 s timeout (asserted from a measured 300-token chain), so neither request can finish by
    itself, and the disconnect is seen long before the timeout could have fired."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from mote_ray.mote.routing import stage_token_ids

    run = copy_model(random_mote_dir, tmp_path / "long")
    shutil.rmtree(run / "vllm", ignore_errors=True)  # rebuilt from the changed base below
    cfg = json.loads((run / "base" / "config.json").read_text())
    (run / "base" / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 4096}))
    # Chains that always run to their budget: the output rows of EOS and the stage end tokens are
    # zero, a logit of 0, which the other (pretrained, untied) rows, with the origin inside their
    # convex hull, always beat somewhere — so no stage ends before its budget.
    tok = AutoTokenizer.from_pretrained(run / "base")
    weights = load_file(run / "base" / "model.safetensors")
    for t in [tok.eos_token_id, *(end for _, end in stage_token_ids(tok).values())]:
        weights["lm_head.weight"][t] = 0.0
    save_file(weights, run / "base" / "model.safetensors", metadata={"format": "pt"})
    timeout = 2.0
    long = {"analysis": 1200, "guidance": 1200, "answer": 1200}
    body = {"model": run.name, "messages": [{"role": "user", "content": "Tell me a story."}],
            "mote": {"mode": "full", "stage_max_tokens": long}}
    with LocalServer(["--model", str(run), "--replicas", "1", "--engine", "vllm", "--no-compile",
                      "--timeout", str(timeout)]) as srv:
        assert _engine_stats(srv.base_url) == {"engine": "vllm", "unfinished_requests": 0, "aborted_requests": 0,
                                               "compiled": False}
        short = (lambda n: json.dumps({**body, "mote": {"mode": "full"}, "max_tokens": n}).encode())
        assert _post(srv.base_url, short(16), None)[0] == 200  # warm-up
        t0 = time.monotonic()
        status, _ = _post(srv.base_url, short(150), None)  # well inside the timeout, even on a busy machine
        per_token = (time.monotonic() - t0) / 150  # this engine's speed on one chain
        assert status == 200 and per_token * 3600 > 2 * timeout, f"{per_token * 1000:.2f} ms/token: too fast for this test"
        req = urllib.request.Request(srv.base_url + "/v1/chat/completions", method="POST",
                                     data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.monotonic()
        resp = urllib.request.urlopen(req, timeout=60)
        resp.readline()  # the stream has started: the engine is generating
        resp.close()  # the client goes away, long before the timeout
        stats = _wait_engine(srv.base_url, 1, 1.0)
        assert time.monotonic() - t0 < timeout, "the disconnect was not seen before the timeout could fire"
        assert stats["unfinished_requests"] == 0 and stats["aborted_requests"] == 1, stats
        status, payload = _post(srv.base_url, json.dumps(body).encode(), None)
        assert status == 504, (payload.get("usage"), payload.get("mote", {}).get("stage_tokens"),
                               payload["choices"][0].get("finish_reason") if status == 200 else None)
        stats = _wait_engine(srv.base_url, 2, 5.0)
        assert stats["unfinished_requests"] == 0 and stats["aborted_requests"] == 2, stats


def test_killed_expert_replica_gives_clean_503s_and_comes_back(trained):
    import os
    import signal

    body = json.dumps({"model": "run", "messages": [{"role": "user", "content": "Question 1?"}],
                       "mote": {"stage_max_tokens": {"analysis": 24, "guidance": 24, "answer": 24}}}).encode()
    # Eager: this is about a replica's death and replacement (the compiled model is tested above).
    with LocalServer(["--model", str(trained), "--replicas", "2", "--expert-cpus", "0.5", "--no-compile"]) as srv:
        before = srv.session_pids("ServeReplica:mote:ExactExpert")
        assert len(before) == 2, srv.output()[-2000:]
        statuses, lock = [], threading.Lock()

        def load(n):
            for _ in range(n):
                status, _ = _post(srv.base_url, body, None, timeout=60)
                with lock:
                    statuses.append(status)

        workers = [threading.Thread(target=load, args=(8,)) for _ in range(3)]
        for w in workers:
            w.start()
        time.sleep(1.0)
        os.kill(before[0], signal.SIGKILL)
        for w in workers:
            w.join(timeout=180)
        assert not any(w.is_alive() for w in workers), "a request hung"
        assert len(statuses) == 24 and set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 12
        deadline = time.monotonic() + 120  # Serve's controller replaces the dead replica
        while time.monotonic() < deadline:
            now = srv.session_pids("ServeReplica:mote:ExactExpert")
            if len(now) == 2 and before[0] not in now:
                break
            time.sleep(2)
        assert len(now) == 2 and before[0] not in now, now
        assert _post(srv.base_url, body, None)[0] == 200


def test_eval_suite_against_the_served_endpoint(server, datasets_dir, tmp_path, monkeypatch):
    """Any OpenAI-compatible URL can be evaluated: here our own app, with its bearer key."""
    from mote_ray.eval.run import EvalConfig, SuiteConfig, run_eval

    monkeypatch.setenv("MOTE_TEST_KEY", KEY)
    cfg = EvalConfig(endpoints=[f"served={server}/v1"], api_key_env="MOTE_TEST_KEY", max_tokens=8, suites=[
        SuiteConfig(name="harmlessness", data=[str(datasets_dir / "advbench/harmful_behaviors.csv")],
                    format="advbench", limit=3)])
    res = run_eval(cfg, tmp_path)["suites"]["harmlessness"]["models"]["served"]
    assert res["answered"] == 3 and res["errors"] == 0 and res["metrics"]["harmless_rate"]["n"] == 3
    rows = [json.loads(line) for line in (tmp_path / "responses/harmlessness/served.jsonl").open()]
    assert all(isinstance(r["response"], str) and r["completion_tokens"] > 0 for r in rows)


SPEC = str(SHARED / "openai" / "openapi.yaml")


def _stream_events(server, payload: dict) -> list[dict]:
    req = urllib.request.Request(server + "/v1/chat/completions", data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        lines = r.read().decode().splitlines()
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]


@pytest.mark.parametrize("params", [
    {}, {"max_tokens": 6}, {"max_completion_tokens": 30, "stop": ["e", "a"]}, {"temperature": 0.9, "top_p": 0.5, "seed": 4},
    {"presence_penalty": 1.5, "frequency_penalty": 1.0, "max_tokens": 20},
    {"mote": {"mode": "full", "return_stages": True, "stage_max_tokens": {"analysis": 4, "guidance": 4}}},
])
def test_live_responses_conform_to_the_official_schemas_and_keep_max_tokens(server, client, params):
    from mote_ray.serving.conformance import violations

    model = client.models.list().data[0].id
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Question 5?"}, {"type": "text", "text": "Be brief."}]}]
    status, body = _post(server, json.dumps({"model": model, "messages": msgs, **params}).encode(), KEY, timeout=120)
    assert status == 200, body
    assert violations(SPEC, "CreateChatCompletionResponse", body) == []
    limit = params.get("max_tokens") or params.get("max_completion_tokens")
    if limit:  # the whole completion, stages included
        assert body["usage"]["completion_tokens"] <= limit
    for s in params.get("stop", []):
        assert s not in body["choices"][0]["message"]["content"]
    events = _stream_events(server, {"model": model, "messages": msgs, "stream": True,
                                     "stream_options": {"include_usage": True}, **params})
    for e in events:
        assert "error" not in e and violations(SPEC, "CreateChatCompletionStreamResponse", e) == [], e
    assert events[-1]["usage"]["completion_tokens"] == body["usage"]["completion_tokens"] or "temperature" in params
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    if "temperature" not in params:  # greedy: the stream says what the completion said
        assert text == body["choices"][0]["message"]["content"]


def test_requests_generated_from_the_official_spec_work_or_name_the_field(server, client):
    """Schemathesis draws CreateChatCompletionRequest bodies from the official spec; each one either
    gets a conformant 200 or a 400 whose `param` is a field the request carried."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    from mote_ray.serving.conformance import violations

    op = schemathesis.openapi.from_path(SPEC)["/chat/completions"]["POST"]
    model, bodies = client.models.list().data[0].id, []

    @settings(max_examples=25, phases=[Phase.generate], suppress_health_check=list(HealthCheck), deadline=None,
              database=None, derandomize=True)
    @given(op.as_strategy())
    def draw(case):
        bodies.append(case.body)

    draw()
    outcomes = set()
    for b in bodies:
        b = {**b, "model": model, "max_completion_tokens": 8} if isinstance(b, dict) else b
        if isinstance(b, dict):  # our model and a small budget; streaming is checked in the test above
            b.pop("max_tokens", None), b.pop("stream_options", None)
            b["stream"] = False
        status, payload = _post(server, json.dumps(b).encode(), KEY, timeout=120)
        outcomes.add(status)
        if status == 200:
            assert violations(SPEC, "CreateChatCompletionResponse", payload) == [], b
        else:
            assert status == 400, (status, payload, b)
            assert payload["error"]["param"].split(".")[0] in b, (payload, b)
    assert 400 in outcomes
