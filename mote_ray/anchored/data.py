"""Gold-labelled tasks for anchored pairs: multiple-choice QA in the public sets' own formats, and
safety decisions (should-refuse vs should-answer prompts).

  arc / openbookqa  JSON Lines: question.stem, question.choices[{text, label}], answerKey
                    (ARC: some items use labels "1"-"4", some have 3 or 5 choices; labels become A-E)
  aqua              JSON Lines (even under .json): question, options ["A)..."], correct
  logiqa            plain text, 8 lines per item: blank, gold letter (a-d), passage, question, 4 options "A."...
  safety            any prompt file (eval loaders); gold "refuse" or "answer" given per file
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from mote_ray.errors import MoteError
from mote_ray.inputs import Reject

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Task:
    id: str
    question: str
    gold: str  # a choice letter, or "refuse" / "answer" for safety decisions
    choices: dict[str, str] = field(default_factory=dict)  # letter -> text (empty for safety)
    kind: str = "mc"  # "mc" | "safety"

    def prompt(self) -> str:
        if self.kind == "safety":
            return self.question
        opts = "\n".join(f"{k}) {v}" for k, v in self.choices.items())
        return f"{self.question}\n{opts}"


def load_tasks(path: str, fmt: str, gold: str | None = None, limit: int | None = None) -> tuple[list[Task], list[Reject]]:
    p = Path(path)
    if not p.is_file():
        raise MoteError(f"task file not found: {path}")
    if fmt == "logiqa":
        return _logiqa(p, limit)
    if fmt == "safety":
        if gold not in ("refuse", "answer"):
            raise MoteError("safety tasks need --gold refuse (harmful prompts) or --gold answer (benign ones)")
        from mote_ray.eval.data import load_items

        items, rejects = load_items([path], limit=limit)
        return [Task(id=i.id, question=i.prompt, gold=gold, kind="safety") for i in items], rejects
    readers = {"arc": _obqa, "openbookqa": _obqa, "aqua": _aqua}
    if fmt not in readers:
        raise MoteError(f"unknown task format {fmt!r}; one of arc, openbookqa, aqua, logiqa, safety")
    tasks, rejects = [], []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            tasks.append(readers[fmt](json.loads(line), f"{p.stem}-{n}"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            rejects.append(Reject(source=path, row=n, reason=f"{type(e).__name__}: {e}"[:200], raw=line[:300]))
        if limit and len(tasks) >= limit:
            break
    return tasks, rejects


def _obqa(row: dict, fallback: str) -> Task:
    q = row["question"]
    labels = [c["label"] for c in q["choices"]]
    # ARC's numeric labels ("1"-"4") become letters, so every task answers with a letter.
    relabel = {lab: LETTERS[i] for i, lab in enumerate(labels)}
    choices = {relabel[c["label"]]: c["text"] for c in q["choices"]}
    if row["answerKey"] not in relabel:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of the labels {labels}")
    if not q["stem"].strip() or len(choices) < 2:
        raise ValueError("empty question or fewer than two choices")
    return Task(id=str(row.get("id") or fallback), question=q["stem"].strip(), gold=relabel[row["answerKey"]],
                choices=choices)


def _aqua(row: dict, fallback: str) -> Task:
    choices = {}
    for opt in row["options"]:
        letter, sep, text = opt.partition(")")
        if not sep or letter.strip() not in LETTERS[:8]:
            raise ValueError(f"option {opt!r} is not 'X)text'")
        choices[letter.strip()] = text.strip()
    if row["correct"] not in choices:
        raise ValueError(f"correct {row['correct']!r} is not an option")
    return Task(id=fallback, question=row["question"].strip(), gold=row["correct"], choices=choices)


def _logiqa(p: Path, limit: int | None) -> tuple[list[Task], list[Reject]]:
    lines = p.read_text(encoding="utf-8").split("\n")
    tasks, rejects = [], []
    for start in range(0, len(lines) - 7, 8):
        block = lines[start:start + 8]
        try:
            gold = block[1].strip().upper()
            opts = block[4:8]
            choices = {}
            for o in opts:
                letter, sep, text = o.strip().partition(".")
                if not sep or letter not in "ABCD":
                    raise ValueError(f"option {o[:40]!r} is not 'X. text'")
                choices[letter] = text.strip()
            if gold not in choices:
                raise ValueError(f"gold letter {block[1]!r} is not a-d")
            tasks.append(Task(id=f"{p.stem}-{start // 8 + 1}", question=f"{block[2].strip()}\n{block[3].strip()}",
                              gold=gold, choices=choices))
        except ValueError as e:
            rejects.append(Reject(source=str(p), row=start + 1, reason=str(e), raw="\n".join(block)[:300]))
        if limit and len(tasks) >= limit:
            break
    return tasks, rejects
