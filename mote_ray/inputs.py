"""Prompt inputs: read JSONL, JSON, CSV, Parquet, HH-RLHF dialogues or hub datasets into one schema.

Every input row ends up either as a `PromptRow` (normalised, de-duplicated, validated) or in the
rejects list with its reason, never silently dropped. Ids are content hashes of the normalised
dialogue, so the same prompt gets the same id on every run (what resuming relies on).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Iterator, Literal

from pydantic import BaseModel

from mote_ray.errors import MoteError
from mote_ray.records import Message

Format = Literal["auto", "jsonl", "json", "csv", "parquet", "hh-rlhf", "hf"]
FORMATS = ("auto", "jsonl", "json", "csv", "parquet", "hh-rlhf", "hf")
# Columns tried, in order, when no mapping is given (AdvBench goal, HarmBench Behavior, Alpaca instruction, ...).
PROMPT_COLUMNS = ("prompt", "question", "instruction", "goal", "behavior", "Behavior", "query", "text", "input")
MAX_PROMPT_CHARS = 20_000
_TURN = re.compile(r"\n\n(Human|Assistant): ")


class PromptRow(BaseModel):
    id: str
    source: str  # file (or hub dataset) it came from
    row: int  # 1-based row/line number in the source
    history: list[Message]
    question: str


class Reject(BaseModel):
    source: str
    row: int
    reason: str
    raw: str  # the offending input, truncated


def read_prompts(paths: list[str], fmt: Format = "auto", column: str | None = None,
                 context_column: str | None = None) -> tuple[list[PromptRow], list[Reject]]:
    """Read every file; returns accepted rows (first occurrence wins) and rejects with reasons."""
    rows, rejects, seen = [], [], {}
    for path in paths:
        for n, item in records(path, fmt):
            try:
                history, question = _to_dialogue(item, column, context_column)
                question = _clean(question)
                if not question:
                    raise ValueError("empty prompt")
                if len(question) > MAX_PROMPT_CHARS:
                    raise ValueError(f"prompt has {len(question)} characters (limit {MAX_PROMPT_CHARS})")
            except ValueError as e:
                rejects.append(Reject(source=path, row=n, reason=str(e), raw=_raw(item)))
                continue
            pid = prompt_id(history, question)
            if pid in seen:
                rejects.append(Reject(source=path, row=n, reason=f"duplicate of {seen[pid]}", raw=_raw(item)))
                continue
            seen[pid] = f"{path}:{n}"
            rows.append(PromptRow(id=pid, source=path, row=n, history=history, question=question))
    return rows, rejects


def prompt_id(history: list[Message], question: str) -> str:
    key = "\x1e".join([f"{m.role}:{_norm(m.content)}" for m in history] + [_norm(question)])
    return "p-" + hashlib.sha1(key.encode()).hexdigest()[:16]


def detect_format(path: str) -> str:
    if path.startswith("hf:"):
        return "hf"
    name = path.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".json")):
        # HH-RLHF dialogues are JSONL with `chosen`; AQuA-style .json files are JSONL too.
        first = _first_line(path)
        if first.startswith("[") or first.startswith("{") and not first.rstrip().endswith("}"):
            return "json"
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            return "jsonl"
        return "hh-rlhf" if isinstance(obj, dict) and "chosen" in obj else "jsonl"
    raise MoteError(f"cannot tell the format of {path}; pass --format ({', '.join(FORMATS[1:])})")


# ---------------------------------------------------------------- readers: (row number, record)

def records(path: str, fmt: Format = "auto") -> Iterator[tuple[int, object]]:
    if not path.startswith("hf:") and not Path(path).is_file():
        raise MoteError(f"prompt file not found: {path}")
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind in ("jsonl", "hh-rlhf"):
        for n, line in enumerate(_open_text(path), start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, _Broken(line, f"invalid JSON: {e.msg}")
    elif kind == "json":
        text = _open_text(path).read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:  # JSON Lines under a .json name
            yield from _records_jsonl_text(text)
            return
        items = data if isinstance(data, list) else data.get("data") or data.get("rows") or [data]
        yield from enumerate(items, start=1)
    elif kind == "csv":
        yield from csv_records(_open_text(path).read())
    elif kind == "parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
    elif kind == "hf":
        yield from enumerate(_hub_dataset(path[3:]), start=1)
    else:
        raise MoteError(f"unknown input format {kind!r}; one of {', '.join(FORMATS)}")


def csv_records(text: str) -> Iterator[tuple[int, object]]:
    """(record number, {header: value}) for each data record of a CSV text.

    A `#` line is a comment only where a record starts (refusal_labels' header lines); inside a
    quoted field (a Markdown heading in a HarmBench ContextString) it is data, so comments are
    skipped between records, never by filtering lines before parsing. Records are numbered
    1, 2, ... after the header, as `csv.DictReader` numbers them; a record whose field count
    differs from the header's comes back `_Broken`, so it lands in the rejects with its reason.
    """
    lines = _RecordLines(io.StringIO(text, newline=""))
    reader = csv.reader(lines)
    header = None
    n = 0
    for fields in reader:
        lines.at_record_start = True
        if header is None:
            header = fields
            continue
        if not fields:  # a blank line, which csv.DictReader skips too
            continue
        n += 1
        if len(fields) != len(header):
            yield n, _Broken(",".join(fields), f"CSV record has {len(fields)} fields, the header has {len(header)}")
        else:
            yield n, dict(zip(header, fields))


class _RecordLines:
    """Line iterator for csv.reader that drops `#` lines only at the start of a record (csv.reader
    asks for exactly the lines of one record per row, so the flag marks record boundaries)."""

    def __init__(self, f):
        self.f, self.at_record_start = f, True

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self.f)
        while self.at_record_start and line.startswith("#"):
            line = next(self.f)
        self.at_record_start = False
        return line


def _records_jsonl_text(text: str):
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, _Broken(line, f"invalid JSON: {e.msg}")


def _hub_dataset(spec: str):
    name, _, split = spec.partition(":")
    try:
        from datasets import load_dataset

        return load_dataset(name, split=split or "train")
    except Exception as e:  # hub/network errors come in many types
        raise MoteError(f"cannot load hub dataset {name!r} ({type(e).__name__}: {str(e)[:160]})") from None


class _Broken:
    def __init__(self, raw: str, reason: str):
        self.raw, self.reason = raw, reason


def _to_dialogue(item, column: str | None, context_column: str | None) -> tuple[list[Message], str]:
    if isinstance(item, _Broken):
        raise ValueError(item.reason)
    if isinstance(item, str):
        return [], item
    if not isinstance(item, dict):
        raise ValueError(f"row is a {type(item).__name__}, not an object")
    if column is None and "chosen" in item and isinstance(item["chosen"], str):
        return parse_hh_dialogue(item["chosen"])
    if column is None and isinstance(item.get("messages"), list):
        return _from_messages(item["messages"])
    key = column or next((c for c in PROMPT_COLUMNS if c in item), None)
    if key is None or key not in item:
        raise ValueError(f"no prompt column (looked for {column or ', '.join(PROMPT_COLUMNS)}; row has {sorted(item)})")
    value = item[key]
    if not isinstance(value, str):
        raise ValueError(f"column {key!r} holds a {type(value).__name__}, not text")
    context = item.get(context_column or "ContextString") or ""
    if key == "instruction" and isinstance(item.get("input"), str) and item["input"].strip():
        value = f"{value}\n\n{item['input']}"  # Alpaca rows with an input field
    return [], f"{context}\n\n{value}" if isinstance(context, str) and context.strip() else value


def parse_hh_dialogue(text: str) -> tuple[list[Message], str]:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` -> (history before the last human turn, last human turn)."""
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH-RLHF dialogue (expected '\\n\\nHuman: ...' turns)")
    turns = [Message(role="user" if who == "Human" else "assistant", content=body.strip())
             for who, body in zip(parts[1::2], parts[2::2])]
    last = max((i for i, t in enumerate(turns) if t.role == "user"), default=None)
    if last is None:
        raise ValueError("dialogue has no Human turn")
    return turns[:last], turns[last].content


def _from_messages(msgs: list) -> tuple[list[Message], str]:
    try:
        turns = [Message(**m) for m in msgs]
    except Exception as e:
        raise ValueError(f"bad messages: {str(e).splitlines()[0]}") from None
    if not turns or turns[-1].role != "user":
        raise ValueError("messages must end with a user turn")
    return turns[:-1], turns[-1].content


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _raw(item) -> str:
    raw = item.raw if isinstance(item, _Broken) else json.dumps(item, default=str, ensure_ascii=False)
    return raw[:500]


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _first_line(path: str) -> str:
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                return line.strip()
    return ""
