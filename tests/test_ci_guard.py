"""In CI a missing ../shared fails the run with one message instead of skipping nearly every test."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pytest(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_records.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_ci_without_shared_fails_with_one_clear_message(tmp_path):
    p = _pytest({"CI": "true", "MOTE_SHARED": "/nonexistent-shared"})
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert out.count("shared models and datasets are missing at /nonexistent-shared") == 1
    assert "passed" not in out  # nothing ran
    # A shared folder missing only part of what tests read is named, not skipped past.
    partial = tmp_path / "shared"
    for d in ("models", "datasets", "kuberay"):
        (partial / d).mkdir(parents=True)
    p = _pytest({"CI": "true", "MOTE_SHARED": str(partial)})
    assert p.returncode != 0 and f"{partial} lacks openai/" in p.stdout + p.stderr
    # Outside CI the same missing folder only skips the tests that need it.
    assert _pytest({"CI": "", "MOTE_SHARED": "/nonexistent-shared"}).returncode == 0
