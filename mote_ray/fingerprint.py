"""Fingerprints of what determines a job's output, so a resumed run never mixes two configurations.

A job writes `fingerprint.json` into its output folder before it writes any output. A rerun on the
same folder compares: equal -> resume; different -> `MoteError` naming every field that changed
(old -> new) and the way out (`--restart` discards the old output, or another `--out`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from mote_ray.errors import MoteError

FILE = "fingerprint.json"


def model_identity(path: str) -> dict[str, Any]:
    """A model folder's identity without hashing gigabytes: config.json's digest plus the name and
    size of every weight file (a retrained or replaced model changes one of them)."""
    p = Path(path)
    out: dict[str, Any] = {"path": str(p)}
    cfg = p / "config.json"
    if cfg.is_file():
        out["config_sha1"] = hashlib.sha1(cfg.read_bytes()).hexdigest()[:16]
    weights = sorted(f for f in p.rglob("*") if f.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
    out["weights"] = {str(f.relative_to(p)): f.stat().st_size for f in weights}
    return out


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def changes(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return [f"{k}: {_short(a.get(k, '(unset)'))} -> {_short(b.get(k, '(unset)'))}"
            for k in sorted(set(a) | set(b)) if a.get(k, "(unset)") != b.get(k, "(unset)")]


def check(folder: Path, fingerprint: dict, *, has_output: bool, restart: bool, what: str,
          clear: list[Path] | None = None, file: str = FILE) -> None:
    """Refuse to resume `folder` under a different fingerprint; with `restart`, remove `clear`
    (the job's outputs) first. Writes the fingerprint when the folder is (now) fresh or equal."""
    f = folder / file
    f.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = json.loads(json.dumps(fingerprint, default=str))  # the form it takes on disk
    if restart:
        for p in clear or []:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        f.unlink(missing_ok=True)
    elif f.is_file():
        old = json.loads(f.read_text())
        diff = changes(old, fingerprint)
        if diff:
            raise MoteError(f"{what} in {folder} was made with a different configuration, and resuming would "
                            f"mix the two: {'; '.join(diff)}. Rerun with --restart to discard it and start "
                            f"over, or use another --out")
        return
    elif has_output:
        raise MoteError(f"{what} in {folder} has output but no {file} (written by an older mote-ray), so it "
                        f"cannot tell whether its configuration matches. Rerun with --restart to start over, "
                        f"or use another --out")
    f.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 80 else s[:77] + "..."
