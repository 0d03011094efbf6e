import pytest
from pydantic import ValidationError

from mote_ray.chat import load_tokenizer, render
from mote_ray.errors import MoteError
from mote_ray.models import resolve_model
from mote_ray.records import GenerationRequest
from mote_ray.stages import (SPECIAL_TOKENS, Stage, Templates, format_chain, format_stages, parse_stages,
                             parse_verdict)


@pytest.mark.parametrize("text,verdict", [
    ("SAFE", "safe"), ("Safe.", "safe"), ("  \nUNSAFE\nbecause", "unsafe"), ("The answer is not safe", "unsafe"),
    ("harmful", "unsafe"), ("It is not harmful.", "safe"), ("SAFE or UNSAFE", "unparseable"),
    ("Once upon a time", "unparseable"), ("", "unparseable"), ("safety first", "unparseable"),
])
def test_verdict_parsing(text, verdict):
    assert parse_verdict(text) == verdict


def test_special_tokens_and_round_trip():
    assert SPECIAL_TOKENS == ["<|analysis|>", "<|end_analysis|>", "<|guidance|>", "<|end_guidance|>",
                              "<|response|>", "<|end_response|>"]
    for stages in ({Stage.ANSWER: "a"}, {Stage.ANALYSIS: "x\ny", Stage.ANSWER: "a"},
                   {Stage.ANALYSIS: "x", Stage.GUIDANCE: "g", Stage.ANSWER: ""}):
        text = "PROMPT " + format_stages(stages)
        assert parse_stages(text) == ("PROMPT ", stages)
    assert "guidance" not in format_stages({Stage.ANALYSIS: "x", Stage.GUIDANCE: None, Stage.ANSWER: "a"})


@pytest.mark.parametrize("bad,msg", [
    ("<|response|>a", "not closed"),
    ("<|response|>a<|end_response|><|analysis|>b<|end_analysis|>", "out of order"),
    ("<|analysis|>a<|end_analysis|>junk", "start token"),
])
def test_malformed_chains_raise(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_stages(bad)


def test_format_chain_keeps_history_and_renders_with_the_template(tiny_model):
    tok = load_tokenizer(resolve_model(tiny_model))
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = format_chain(tok, history, "How do locks work?", {Stage.ANALYSIS: "benign", Stage.ANSWER: "Pins."})
    prompt, stages = parse_stages(text)
    assert prompt == render(tok, GenerationRequest(messages=[*history, {"role": "user", "content": "How do locks work?"}]))
    assert "Hello!" in prompt and stages == {Stage.ANALYSIS: "benign", Stage.ANSWER: "Pins."}


def test_templates_validate_and_override_from_file(tmp_path):
    with pytest.raises(ValidationError, match="unknown placeholder"):
        Templates(check={"system": "x", "user": "{questoin}"})
    f = tmp_path / "t.yaml"
    f.write_text("check:\n  user: 'Q: {question} A: {answer} -> SAFE/UNSAFE?'\n")
    t = Templates.from_file(f)
    assert t.check.user.startswith("Q: {question}") and t.check.system == Templates().check.system
    msgs = t.messages(Stage.CHECK, [], "why?", answer="because")
    assert msgs[-1]["content"] == "Q: why? A: because -> SAFE/UNSAFE?"
    f.write_text("critique: {system: x}\n")
    with pytest.raises(MoteError, match="unknown stage"):
        Templates.from_file(f)


def test_answer_stage_sees_history_and_reasoning():
    hist = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]
    msgs = Templates().messages(Stage.ANSWER, hist, "now?", analysis="risky", guidance="be careful")
    assert msgs[1:3] == hist and msgs[-1] == {"role": "user", "content": "now?"}
    assert "risky" in msgs[0]["content"] and "be careful" in msgs[0]["content"]
    direct = Templates().messages(Stage.ANSWER, [], "now?")
    assert "analysis" not in direct[0]["content"].lower()
