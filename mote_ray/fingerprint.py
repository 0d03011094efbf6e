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
# Raised whenever what a fingerprint records changes shape (v2: models by content, per-request seeds),
# so an older output is named as such instead of diffed field by field against the new layout.
FORMAT = 2
SEEDS = "request_seed/v1"  # how per-request seeds derive from a run's seed (records.request_seed)


# Content identity without reading multi-GB checkpoints. Files up to WHOLE_BYTES (config, tokenizer,
# chat template, generation and adapter configs, a small model's weights) are hashed whole. A larger
# file is identified by its size, its header (safetensors: names, dtypes, shapes; GGUF: all metadata,
# tokenizer and chat template included) and SAMPLES chunks at evenly spaced offsets, first and last
# included: retraining changes the bytes everywhere, so a retrained model of the same shape differs,
# and a 100 GB model costs 4 MiB of reads per file. An edit confined to bytes between the samples of
# a large file (one tensor changed by hand) goes unseen.
WHOLE_BYTES = 32 << 20
SAMPLES, CHUNK = 64, 64 << 10
# The config and tokenizer files a loader may read beside a .gguf file.
GGUF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
# A `mote-ray train` output answers with these; vllm/ is derived from them (and written on first
# use), checkpoint/ and mlruns/ belong to the run, not the model.
TRAIN_PARTS = ("base", "mote", "adapters")


def model_identity(path: str, gguf_file: str | None = None) -> dict[str, Any]:
    """{"files": {relative path: file_digest}} of what a model answers with: a Hugging Face folder's
    files (hidden ones and docs aside), a `mote-ray train` output's TRAIN_PARTS, or a .gguf file
    (`path` itself, or `gguf_file` inside it) with the GGUF_SIDE_FILES beside it. By content, not
    location: an identical copy elsewhere has the same identity."""
    p = Path(path)
    if p.is_file():
        p, gguf_file = p.parent, p.name
    if gguf_file:
        files = [p / gguf_file] + [p / n for n in GGUF_SIDE_FILES if (p / n).is_file()]
    elif (p / "mote").is_dir() and (p / "base").is_dir():
        files = [f for part in TRAIN_PARTS for f in _files(p / part)]
    else:
        files = _files(p)
    return {"files": {f.relative_to(p).as_posix(): file_digest(f) for f in sorted(files)}}


def file_digest(f: Path) -> str:
    """"SIZE:SHA256-PREFIX" of a file's content, whole or sampled (see WHOLE_BYTES)."""
    size = f.stat().st_size
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        if size <= WHOLE_BYTES:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(fh.read(_header_size(f, fh, size)))
            for i in range(SAMPLES):
                fh.seek((size - CHUNK) * i // (SAMPLES - 1))
                h.update(fh.read(CHUNK))
    return f"{size}:{h.hexdigest()[:24]}"


def content_identity(paths: list) -> str:
    """One digest of the content of `paths` in order (a folder by its files), files named relative
    to what was given, so a moved copy has the same identity; a path that is not local (hf:NAME)
    counts by its name."""
    h = hashlib.sha256()
    for p in map(Path, paths):
        files = ({f.relative_to(p).as_posix(): f for f in _files(p)} if p.is_dir()
                 else {p.name: p} if p.is_file() else {})
        h.update(b"" if files else f"{p}\0".encode())
        for name in sorted(files):
            h.update(f"{name}:{file_digest(files[name])}\0".encode())
    return h.hexdigest()[:24]


def engine_identity(e) -> dict[str, Any]:
    """What an EngineConfig answers with: the model's content and the engine actually chosen
    ("auto" resolves per machine) with the settings that change its tokens."""
    from mote_ray.engines import choose_engine
    from mote_ray.models import resolve_model

    resolved = resolve_model(e.model, e.gguf_file)
    choice = choose_engine(e, resolved)
    return {"model": model_identity(resolved.path, resolved.gguf_file),
            "engine": {"name": choice.name, "device": choice.device, "dtype": e.dtype,
                       "max_model_len": e.max_model_len, "seed": e.seed}}


def _files(folder: Path) -> list[Path]:
    def skip(f: Path) -> bool:
        rel = f.relative_to(folder).parts
        return any(part.startswith(".") for part in rel) or rel[-1].upper().startswith(("README", "LICENSE"))

    return [f for f in folder.rglob("*") if f.is_file() and not skip(f)]


def _header_size(f: Path, fh, size: int) -> int:
    """Bytes of a large file's header, hashed whole (0 for formats without one; safetensors caps its
    header at 100 MB); leaves `fh` at 0."""
    n = 0
    if f.suffix == ".safetensors":
        n = 8 + int.from_bytes(fh.read(8), "little")
    elif f.suffix == ".gguf":
        from gguf import GGUFReader

        n = GGUFReader(f).data_offset
    fh.seek(0)
    return min(n, size, 100_000_000 + 8)


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
    # the form it takes on disk, with the format: one written by another format cannot be compared
    fingerprint = {"format": FORMAT, **json.loads(json.dumps(fingerprint, default=str))}
    if restart:
        for p in clear or []:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        f.unlink(missing_ok=True)
    elif f.is_file():
        old = json.loads(f.read_text())
        if old.get("format") != FORMAT:
            raise MoteError(f"{what} in {folder} was fingerprinted by another mote-ray version (format "
                            f"{old.get('format', 1)}, this one writes {FORMAT}), so this version cannot tell whether "
                            f"its configuration matches. Rerun with --restart to discard it and start over, or use "
                            f"another --out")
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
