"""The generation job end to end on real engines and a 2-CPU local Ray; kill -9 and resume; ray job submit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mote_ray.config import EngineConfig, PoolConfig
from mote_ray.errors import MoteError
from mote_ray.generation import CHAIN_SCHEMA, GenerateConfig, chain_files, read_chains, run_generate

from .conftest import requires_vllm

pytestmark = pytest.mark.ray
SMALL = {"analysis": 16, "guidance": 16, "answer": 24, "check": 4}


@pytest.fixture(scope="module")
def prompt_files(datasets_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    lines = (datasets_dir / "advbench/harmful_behaviors.csv").read_text().splitlines(keepends=True)
    (d / "adv.csv").write_text("".join(lines[:31]))
    alpaca = json.loads((datasets_dir / "alpaca_instructions/alpaca.json").read_text())[:30]
    with open(d / "alpaca.jsonl", "w") as f:
        for r in alpaca:
            f.write(json.dumps({"prompt": r["instruction"]}) + "\n")
        f.write('{"prompt": 12345}\n{"not_a_prompt": "x"}\n{broken json\n')
    return [str(d / "adv.csv"), str(d / "alpaca.jsonl")]


@pytest.mark.parametrize("engine,model_fixture", [
    ("transformers", "tiny_model"),
    pytest.param("vllm", "tiny_model_hd32", marks=requires_vllm),
])
def test_job_writes_schema_stats_and_rejects(ray_local, prompt_files, tmp_path, request, engine, model_fixture):
    model = request.getfixturevalue(model_fixture)
    config = GenerateConfig(engine=EngineConfig(model=model, engine=engine), pool=PoolConfig(batch_size=16),
                            max_tokens=SMALL)
    stats = run_generate(config, prompt_files, tmp_path, progress=False)
    table = read_chains(tmp_path)
    assert table.schema.equals(CHAIN_SCHEMA) and all(pq.read_schema(f).equals(CHAIN_SCHEMA) for f in chain_files(tmp_path))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 60
    rows = table.to_pylist()
    assert {r["engine"] for r in rows} == {engine} and all(r["answer"] is not None for r in rows)
    # One attempt per stage set tried, the last one on the chain's final stages.
    assert all(len(r["attempts"]) == len(r["stages"]) and r["attempts"][-1]["stages"] == r["stages"]
               for r in rows if r["error"] is None)
    rejects = [json.loads(line) for line in open(tmp_path / "rejects.jsonl")]
    assert sorted(r["row"] for r in rejects) == [31, 32, 33] and all(r["reason"] for r in rejects)
    on_disk = json.loads((tmp_path / "stats.json").read_text())
    assert on_disk == stats and stats["total"] == 60 and stats["rejects"] == 3
    assert stats["with_analysis"] == sum("analysis" in r["stages"] for r in rows)
    assert stats["unsafe_after_all"] == sum(r["flagged"] for r in rows)
    # A rerun finds everything done and generates nothing: not one new part file.
    parts = chain_files(tmp_path)
    again = run_generate(config, prompt_files, tmp_path, progress=False)
    assert again == stats and chain_files(tmp_path) == parts
    if engine != "transformers":
        return
    # A changed sampling setting is never mixed into the old chains: refused, naming the change...
    hotter = config.model_copy(update={"temperature": 0.9})
    with pytest.raises(MoteError, match=r"sampling\.temperature: 0\.7 -> 0\.9.*--restart"):
        run_generate(hotter, prompt_files, tmp_path, progress=False)
    assert chain_files(tmp_path) == parts
    # ...and --restart discards them and starts over under the new fingerprint.
    fresh = run_generate(hotter, prompt_files, tmp_path, limit=3, progress=False, restart=True)
    assert fresh["total"] == 3 and not set(parts) & set(chain_files(tmp_path))
    assert json.loads((tmp_path / "fingerprint.json").read_text())["sampling"]["temperature"] == 0.9


def _mote(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "mote_ray.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "RAY_ADDRESS": ""}, **kw)


def test_sigkill_mid_run_then_resume_is_exactly_once(datasets_dir, tiny_model, tmp_path):
    lines = (datasets_dir / "advbench/harmful_behaviors.csv").read_text().splitlines(keepends=True)
    prompts = tmp_path / "adv.csv"
    prompts.write_text("".join(lines[:49]))
    out = tmp_path / "out"
    args = ["generate", "--model", tiny_model, "--engine", "transformers", "--prompts", str(prompts), "--out",
            str(out), "--batch-size", "4", "--set", "max_tokens={analysis: 8, guidance: 8, answer: 8, check: 2}"]
    p = _mote(*args)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "chains").glob("part-*.parquet")) and p.poll() is None:
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    partial = sum(pq.read_metadata(f).num_rows for f in chain_files(out))
    assert 0 < partial < 48, "the kill did not land mid-run"
    p = _mote(*args)
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log[-2000:]
    assert f"{partial} already done" in log
    ids = read_chains(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 48


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head(tmp_path):
    """A real `ray start --head` cluster of our own; stopped by killing only its processes."""
    import psutil

    temp = Path("/tmp") / f"mote-head-{os.getpid()}"
    # Every port free and explicit: the session's own Ray instance already holds the defaults
    # (the dashboard agent's 52365 among them), and a head whose agent cannot bind takes no jobs.
    port, dash, agent, grpc, env_agent, metrics, client = _free_ports(7)
    ray_bin = Path(sys.executable).parent / "ray"
    subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                    f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
                    f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
                    f"--ray-client-server-port={client}", "--num-cpus=2", f"--temp-dir={temp}",
                    "--include-dashboard=true"], check=True, capture_output=True, text=True, timeout=120)
    yield f"http://127.0.0.1:{dash}"
    ours = (str(temp), f":{port}")  # session files, or the GCS address (the Ray client server has only that)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(mark in part for part in proc.info["cmdline"] or [] for mark in ours):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    import shutil

    shutil.rmtree(temp, ignore_errors=True)
    marker = Path("/tmp/ray/ray_current_cluster")
    if marker.exists() and str(port) in marker.read_text():
        marker.unlink()


def test_ray_job_submit_runs_jobs_generate(ray_head, prompt_files, tiny_model, tmp_path):
    root = Path(__file__).resolve().parents[1]
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": ray_head}
    cmd = [str(ray_bin), "job", "submit", "--address", ray_head, "--", sys.executable,
           str(root / "jobs/generate.py"), "--model", tiny_model, "--engine", "transformers",
           "--prompts", prompt_files[0], "--limit", "6", "--out", str(tmp_path / "out"),
           "--set", "max_tokens={analysis: 8, guidance: 8, answer: 8, check: 2}"]
    for _ in range(30):  # a fresh head's dashboard agent takes a few seconds to accept jobs
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if "No available agent to submit job" not in p.stderr + p.stdout:
            break
        time.sleep(3)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "succeeded" in (p.stdout + p.stderr).lower()
    assert json.loads((tmp_path / "out/stats.json").read_text())["total"] == 6
