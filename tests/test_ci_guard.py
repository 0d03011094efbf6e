"""In CI a missing ../shared fails the run with one message instead of skipping nearly every test."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pytest(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_records.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_ci_without_shared_fails_with_one_clear_message():
    p = _pytest({"CI": "true", "MOTE_SHARED": "/nonexistent-shared"})
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert out.count("shared models and datasets are missing at /nonexistent-shared") == 1
    assert "passed" not in out  # nothing ran
    # Outside CI the same missing folder only skips the tests that need it.
    assert _pytest({"CI": "", "MOTE_SHARED": "/nonexistent-shared"}).returncode == 0
