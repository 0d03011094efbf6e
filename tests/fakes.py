"""A scripted engine for control-flow tests of branches the real tiny model cannot be steered into.

Every feature is also tested on a real engine; this one only answers by stage, from a script.
"""

from __future__ import annotations

from types import SimpleNamespace

from mote_ray.records import GenerationResult


class ScriptedEngine:
    """`verdicts[question]` = the check outputs, in order, for that question's attempts."""

    name = "scripted"

    def __init__(self, tokenizer, verdicts: dict[str, list[str]], max_model_len: int = 512):
        self.tokenizer, self.verdicts = tokenizer, {k: list(v) for k, v in verdicts.items()}
        self.config = SimpleNamespace(max_model_len=max_model_len)
        self.model = SimpleNamespace(name="scripted")
        self.calls: list[list[str]] = []  # stage of each request, per generate() call

    def generate(self, requests):
        stages = [r.id.rsplit(":", 1)[1] for r in requests]
        self.calls.append(stages)
        out = []
        for r, stage in zip(requests, stages):
            question = r.messages[-1].content
            key = next(k for k in self.verdicts if k in question)
            text = self.verdicts[key].pop(0) if stage == "check" else f"{stage} for {key}"
            out.append(GenerationResult(id=r.id, text=text, token_ids=[5] * 3, prompt_tokens=10,
                                        completion_tokens=3, finish_reason="stop", engine=self.name, model="scripted"))
        return out

    def close(self):
        pass


def write_format_chains(out, n: int, question: str = "Question {i}?"):
    """A generation-output folder (`out/chains/part-*.parquet`) of n format-only chains with fixed stage texts."""
    from mote_ray.generation import write_chains

    write_chains([{"id": f"f{i}", "question": question.format(i=i), "analysis": "Low risk.", "guidance": "Be brief.",
                   "answer": "Here you go."} for i in range(n)], out, source="fixture")
    return out
