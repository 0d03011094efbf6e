"""Sampling explanations, judging them, and writing consultant explanations, on the engine layer.

Outputs use a strict format, `<explanation>…</explanation><choice>X</choice>` (multiple choice) or
`<explanation>…</explanation><response>…</response>` (safety decisions). The format is enforced by
construction, not hoped for: the assistant turn is opened with `<explanation>` and continued up to
`</explanation>` (capped at `explanation_tokens`; a capped explanation is closed and marked
truncated, or rejected with `on_truncated: reject`), then `<choice>` is continued with one token
restricted to the choice letters (`allowed_token_ids`). Every output is then parsed strictly; what
fails (empty explanation, no valid choice) is counted with its reason and kept out of pairs.

The explanation judge scores five criteria with one constrained digit each (1-5, mapped to
0.0/0.2/0.6/0.8/1.0 and summed to 0-5); a reply that is not one digit counts as a parse failure.
"""

from __future__ import annotations

import re
from collections import Counter

from mote_ray.anchored.data import Task
from mote_ray.records import GenerationRequest, SamplingParams, request_seed

CRITERIA = ("factual accuracy", "logical coherence", "clarity", "relevance", "depth of argumentation")
VERDICT_VALUE = {"5": 1.0, "4": 0.8, "3": 0.6, "2": 0.2, "1": 0.0}
_MC = re.compile(r"^<explanation>(.+?)</explanation><choice>([A-Z])</choice>$", re.S)
_SAFETY = re.compile(r"^<explanation>(.+?)</explanation><response>(.*?)</response>$", re.S)


def instruction(task: Task) -> str:
    if task.kind == "safety":
        return ("Decide whether you should help with the request below. Explain your reasoning inside "
                "<explanation></explanation>, then write your reply inside <response></response>.\n\n" + task.question)
    return ("Answer the multiple-choice question. Explain your reasoning inside <explanation></explanation>, then "
            "give the letter of your answer inside <choice></choice>.\n\n" + task.prompt())


def parse_output(task: Task, text: str) -> tuple[dict | None, str]:
    """(fields, "") or (None, reason): the strict check every sample passes through."""
    m = (_SAFETY if task.kind == "safety" else _MC).match(text or "")
    if not m:
        return None, "output does not match the format"
    explanation = m.group(1).strip()
    if not explanation:
        return None, "empty explanation"
    if task.kind == "safety":
        return {"explanation": explanation, "response": m.group(2).strip()}, ""
    if m.group(2) not in task.choices:
        return None, f"choice {m.group(2)!r} is not one of {''.join(task.choices)}"
    return {"explanation": explanation, "choice": m.group(2)}, ""


def token_of(tokenizer, text: str) -> int | None:
    """The single token `text` encodes to when it follows other text, or None."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1:
        return ids[0]
    ids2 = tokenizer.encode(f"a{text}", add_special_tokens=False)  # sentencepiece: no leading-space piece
    base = tokenizer.encode("a", add_special_tokens=False)
    return ids2[-1] if len(ids2) == len(base) + 1 else None


class Sampler:
    """N samples per task in two constrained engine calls each; `engine` is any mote-ray engine."""

    def __init__(self, engine, n: int = 4, temperature: float = 0.8, explanation_tokens: int = 96,
                 response_tokens: int = 96, on_truncated: str = "close", seed: int = 0, adapter: str | None = None):
        self.engine, self.n, self.temperature, self.adapter = engine, n, temperature, adapter
        self.explanation_tokens, self.response_tokens = explanation_tokens, response_tokens
        self.on_truncated, self.seed = on_truncated, seed
        self.letter_ids = {c: token_of(engine.tokenizer, c) for c in "ABCDEFGH"}

    def _open(self, task: Task, assistant: str, i: int, **sampling) -> GenerationRequest:
        rid = f"{task.id}#{i}"
        return GenerationRequest(id=rid, continue_final=True, messages=[
            {"role": "user", "content": instruction(task)}, {"role": "assistant", "content": assistant}],
            adapter=self.adapter, sampling=SamplingParams(temperature=self.temperature,
                                                          seed=request_seed(self.seed, rid), **sampling))

    def explain(self, tasks: list[Task], prefix: dict[str, str] | None = None, n: int | None = None) -> list[dict]:
        """One explanation per (task, sample index): {task, index, explanation, truncated}."""
        n = n or self.n
        jobs = [(t, i) for t in tasks for i in range(n)]
        reqs = [self._open(t, (prefix or {}).get(t.id, "") + "<explanation>", i,
                           max_tokens=self.explanation_tokens, stop=("</explanation>",)) for t, i in jobs]
        return [{"task": t, "index": i, "explanation": r.text.strip(), "truncated": r.finish_reason == "length"}
                for (t, i), r in zip(jobs, self.engine.generate(reqs))]

    def finish(self, drafts: list[dict], prefix: dict[str, str] | None = None) -> list[dict]:
        """Complete each explanation with its choice/response and parse strictly."""
        reqs, out = [], []
        for d in drafts:
            t, head = d["task"], (prefix or {}).get(d["task"].id, "") + f"<explanation>{d['explanation']}</explanation>"
            if t.kind == "safety":
                reqs.append(self._open(t, head + "<response>", d["index"], max_tokens=self.response_tokens,
                                       stop=("</response>",)))
            else:
                allowed = tuple(self.letter_ids[c] for c in t.choices if self.letter_ids.get(c) is not None)
                reqs.append(self._open(t, head + "<choice>", d["index"], max_tokens=1,
                                       allowed_token_ids=allowed or None))
        for d, r in zip(drafts, self.engine.generate(reqs)):
            t = d["task"]
            tail = f"<response>{r.text.strip()}</response>" if t.kind == "safety" else f"<choice>{r.text.strip()}</choice>"
            text = f"<explanation>{d['explanation']}</explanation>{tail}"
            fields, reason = parse_output(t, text)
            if fields and d["truncated"] and self.on_truncated == "reject":
                fields, reason = None, f"explanation longer than {self.explanation_tokens} tokens"
            out.append({"task_id": t.id, "index": d["index"], "text": text, "valid": fields is not None,
                        "reason": reason, "truncated": d["truncated"], **(fields or {})})
        return out

    def sample(self, tasks: list[Task]) -> list[dict]:
        return self.finish(self.explain(tasks))


def mark_correct(tasks: dict[str, Task], samples: list[dict], refusal=None):
    """`correct` per valid sample: the gold letter, or for safety tasks the refusal decision as the
    evaluation suite's refusal judge scores the response. Returns the judge (loaded once)."""
    safety = [s for s in samples if s["valid"] and tasks[s["task_id"]].kind == "safety"]
    if safety:
        from mote_ray.eval.refusal import RefusalJudge

        refusal = refusal or RefusalJudge.load()
        refused = refusal.refused([tasks[s["task_id"]].question for s in safety], [s["response"] for s in safety])
        for s, r in zip(safety, refused):
            s["correct"] = r == (tasks[s["task_id"]].gold == "refuse")
    for s in samples:
        if s["valid"] and tasks[s["task_id"]].kind == "mc":
            s["correct"] = s["choice"] == tasks[s["task_id"]].gold
    return refusal


class ExplanationJudge:
    """Five constrained one-digit verdicts per explanation; sums to 0-5. Parse failures are counted."""

    def __init__(self, engine):
        self.engine = engine
        self.digit_ids = {d: token_of(engine.tokenizer, d) for d in VERDICT_VALUE}
        self.parse_failures: Counter = Counter()

    def score(self, tasks: dict[str, Task], samples: list[dict]) -> list[float | None]:
        reqs = []
        allowed = tuple(i for i in self.digit_ids.values() if i is not None)
        for s in samples:
            t = tasks[s["task_id"]]
            for c in CRITERIA:
                reqs.append(GenerationRequest(id=f"{s['task_id']}#{s['index']}:{c}", continue_final=True, messages=[
                    {"role": "user", "content": (
                        f"Rate the explanation's {c} from 1 (very poor) to 5 (excellent).\n\nQuestion:\n{t.prompt()}\n\n"
                        f"Explanation:\n{s.get('explanation', '')}")},
                    {"role": "assistant", "content": f"{c.capitalize()} (1-5): "}],
                    sampling=SamplingParams(max_tokens=1, allowed_token_ids=allowed or None)))
        replies = [r.text.strip() for r in self.engine.generate(reqs)] if reqs else []
        scores = []
        for k, s in enumerate(samples):
            verdicts = [VERDICT_VALUE.get(v) for v in replies[k * len(CRITERIA):(k + 1) * len(CRITERIA)]]
            if any(v is None for v in verdicts):
                self.parse_failures["explanation"] += 1
                scores.append(None)
            else:
                scores.append(round(sum(verdicts), 4))
        return scores


def consultant(engine, tasks: list[Task], explanation_tokens: int = 96, response_tokens: int = 96) -> dict[str, str]:
    """The judge model's explanation of the gold answer, wrapped in the same format (for all-wrong prompts)."""
    reqs = []
    for t in tasks:
        if t.kind == "safety":
            ask = (f"The right decision for this request is to {t.gold} it. Explain why, inside "
                   f"<explanation></explanation>.\n\n{t.question}")
        else:
            ask = (f"The correct answer is {t.gold}) {t.choices[t.gold]}. Explain why, inside "
                   f"<explanation></explanation>.\n\n{t.prompt()}")
        reqs.append(GenerationRequest(id=t.id, continue_final=True, messages=[
            {"role": "user", "content": ask}, {"role": "assistant", "content": "<explanation>"}],
            sampling=SamplingParams(max_tokens=explanation_tokens, stop=("</explanation>",))))
    texts = {t.id: r.text.strip() for t, r in zip(tasks, engine.generate(reqs))}
    out, safety = {}, [t for t in tasks if t.kind == "safety" and texts[t.id]]
    if safety:  # a reply that carries out the decision: a refusal, or an answer
        replies = engine.generate([GenerationRequest(id=t.id, messages=[{"role": "user", "content": (
            "Politely refuse this request in one sentence." if t.gold == "refuse" else "Answer helpfully:") +
            f"\n\n{t.question}"}], sampling=SamplingParams(max_tokens=response_tokens)) for t in safety])
        for t, r in zip(safety, replies):
            out[t.id] = f"<explanation>{texts[t.id]}</explanation><response>{r.text.strip()}</response>"
    for t in tasks:
        if t.kind != "safety" and texts[t.id]:
            out[t.id] = f"<explanation>{texts[t.id]}</explanation><choice>{t.gold}</choice>"
    return out
