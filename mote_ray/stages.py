"""AlignCoT stages: names, special tokens, prompt templates, the training format and its parser.

A chain is Question Analysis -> Answer Guidance -> Safe Answer, with Safety Checking deciding
how many of them a prompt needs (design.md, "The pipeline" step 1). In training text each stage
span sits between its own trainable special tokens; skipped stages are simply absent:

    <prompt rendered by the chat template><|analysis|>...<|end_analysis|><|response|>...<|end_response|>
"""

from __future__ import annotations

import re
import string
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from mote_ray.errors import MoteError


class Stage(str, Enum):
    ANALYSIS = "analysis"
    GUIDANCE = "guidance"
    ANSWER = "answer"
    CHECK = "check"  # writes a verdict, never part of a training chain


CHAIN_STAGES = (Stage.ANALYSIS, Stage.GUIDANCE, Stage.ANSWER)  # order inside a chain
STAGE_TOKENS = {
    Stage.ANALYSIS: ("<|analysis|>", "<|end_analysis|>"),
    Stage.GUIDANCE: ("<|guidance|>", "<|end_guidance|>"),
    Stage.ANSWER: ("<|response|>", "<|end_response|>"),
}
SPECIAL_TOKENS = [tok for pair in STAGE_TOKENS.values() for tok in pair]

Verdict = Literal["safe", "unsafe", "unparseable"]


# ---------------------------------------------------------------- prompt templates

class StageTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    system: str
    user: str


_FIELDS = {"question", "analysis", "guidance", "answer", "reasoning"}


class Templates(BaseModel):
    """Per-stage prompts. Placeholders: {question} {analysis} {guidance} {answer} {reasoning}
    ({reasoning} = the analysis/guidance block the answer stage gets, empty for a direct answer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    analysis: StageTemplate = StageTemplate(
        system=("You are a careful safety analyst. Read the user's request and list its explicit and implicit "
                "risks: who could be harmed, how, and what the user most likely needs. Do not answer it."),
        user="Request: {question}\n\nAnalysis:")
    guidance: StageTemplate = StageTemplate(
        system=("You plan safe, helpful answers. Given a request and its risk analysis, say in a few sentences "
                "how to answer: what to include, what to refuse or redirect, and the tone. Do not answer it."),
        user="Request: {question}\n\nRisk analysis: {analysis}\n\nGuidance:")
    answer: StageTemplate = StageTemplate(
        system=("You are a helpful and harmless assistant. Answer the user helpfully; decline only what would "
                "cause real harm, and then explain why and offer a safe alternative.{reasoning}"),
        user="{question}")
    check: StageTemplate = StageTemplate(
        system=("You check answers for safety. An answer is UNSAFE if it helps cause harm, is hateful, or gives "
                "dangerous instructions; otherwise it is SAFE. Reply with one word: SAFE or UNSAFE."),
        user="Request: {question}\n\nAnswer: {answer}\n\nVerdict:")

    @field_validator("*")
    @classmethod
    def _known_placeholders(cls, t: StageTemplate) -> StageTemplate:
        for text in (t.system, t.user):
            names = {f for _, f, _, _ in string.Formatter().parse(text) if f}
            if names - _FIELDS:
                raise ValueError(f"unknown placeholder(s) {sorted(names - _FIELDS)} in {text[:60]!r}; "
                                 f"allowed: {sorted(_FIELDS)}")
        return t

    @classmethod
    def from_file(cls, path: str | Path) -> Templates:
        """Override any stage's template from YAML: `{analysis: {system: ..., user: ...}, ...}`."""
        from mote_ray.config import load_yaml

        data = load_yaml(path)
        unknown = set(data) - set(cls.model_fields)
        if unknown:
            raise MoteError(f"{path}: unknown stage(s) {sorted(unknown)}; stages are {sorted(cls.model_fields)}")
        defaults = cls()
        return cls(**{k: {**getattr(defaults, k).model_dump(), **(v or {})} for k, v in data.items()})

    def messages(self, stage: Stage, history: list[dict], question: str, analysis: str | None = None,
                 guidance: str | None = None, answer: str | None = None) -> list[dict]:
        """The chat for one stage call: system instruction, the dialogue so far, the stage's user turn."""
        reasoning = ""
        if analysis:
            reasoning += f"\n\nQuestion analysis (yours, to use): {analysis}"
        if guidance:
            reasoning += f"\n\nAnswer guidance (yours, to follow): {guidance}"
        values = dict(question=question, analysis=analysis or "", guidance=guidance or "", answer=answer or "",
                      reasoning=reasoning)
        t: StageTemplate = getattr(self, stage.value)
        turns = list(history) if stage is Stage.ANSWER else []  # other stages quote the request only
        return [{"role": "system", "content": t.system.format(**values)}, *turns,
                {"role": "user", "content": t.user.format(**values)}]


# ---------------------------------------------------------------- self-check verdicts

_UNSAFE = re.compile(r"\b(unsafe|not safe|harmful|dangerous)\b")
_SAFE = re.compile(r"\b(safe|harmless|not harmful)\b")


def parse_verdict(text: str) -> Verdict:
    """SAFE/UNSAFE from the first non-empty line; both or neither there -> 'unparseable' (treated as unsafe)."""
    line = next((ln for ln in text.lower().splitlines() if ln.strip()), "")
    line = line.replace("not harmful", "harmless")
    unsafe = bool(_UNSAFE.search(line))
    safe = bool(_SAFE.search(_UNSAFE.sub(" ", line)))
    if unsafe == safe:
        return "unparseable"
    return "unsafe" if unsafe else "safe"


# ---------------------------------------------------------------- training format

_SPAN = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def format_stages(stages: dict[Stage, str | None]) -> str:
    """The stage spans of a chain, in chain order; stages that are None or absent are skipped."""
    out = []
    for stage in CHAIN_STAGES:
        text = stages.get(stage)
        if text is not None:
            start, end = STAGE_TOKENS[stage]
            out.append(f"{start}{text}{end}")
    return "".join(out)


def parse_stages(text: str) -> tuple[str, dict[Stage, str]]:
    """Split training text into (prompt, {stage: text}); raises ValueError on a malformed chain."""
    m = _SPAN.search(text)
    prompt = text[:m.start()] if m else text
    rest, stages, order = text[len(prompt):], {}, -1
    while rest:
        for stage, (start, end) in STAGE_TOKENS.items():
            if rest.startswith(start):
                break
        else:
            raise ValueError(f"expected a stage start token at {rest[:30]!r}")
        close = rest.find(end, len(start))
        if close < 0:
            raise ValueError(f"{stage.value} span is not closed by {end}")
        idx = CHAIN_STAGES.index(stage)
        if idx <= order:
            raise ValueError(f"{stage.value} appears out of order")
        stages[stage], order, rest = rest[len(start):close], idx, rest[close + len(end):]
    return prompt, stages


def format_chain(tokenizer, history: list[dict], question: str, stages: dict[Stage, str | None]) -> str:
    """One training sequence: the dialogue rendered by the chat template, then the stage spans."""
    from mote_ray.chat import render
    from mote_ray.records import GenerationRequest

    prompt = render(tokenizer, GenerationRequest(messages=[*history, {"role": "user", "content": question}]))
    return prompt + format_stages(stages)
