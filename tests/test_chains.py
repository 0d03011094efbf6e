"""Adaptive chain construction: every branch, batching across prompts and stages."""

import pytest

from mote_ray.chains import ChainBuilder, ChainState, advance
from mote_ray.chat import load_tokenizer
from mote_ray.config import EngineConfig
from mote_ray.models import resolve_model
from mote_ray.records import SamplingParams
from mote_ray.stages import Stage, Templates, parse_verdict

from .fakes import ScriptedEngine

MAX = {"analysis": 16, "guidance": 16, "answer": 16, "check": 4}


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(resolve_model(tiny_model))


def build(tok, verdicts, **kw):
    engine = ScriptedEngine(tok, verdicts, **kw)
    return engine, ChainBuilder(engine, Templates(), MAX, SamplingParams())


def rows(*questions):
    return [{"id": f"q{i}", "question": q, "history": []} for i, q in enumerate(questions)]


@pytest.mark.parametrize("script,stages,flagged,n_attempts", [
    (["SAFE"], ["answer"], False, 1),                                           # direct safe
    (["UNSAFE", "Safe."], ["analysis", "answer"], False, 2),                    # needs analysis
    (["unsafe", "UNSAFE", "SAFE"], ["analysis", "guidance", "answer"], False, 3),  # needs guidance
    (["UNSAFE", "UNSAFE", "UNSAFE"], ["analysis", "guidance", "answer"], True, 3),  # unsafe after all
    (["Once upon a", "SAFE or UNSAFE", "the cat"], ["analysis", "guidance", "answer"], True, 3),  # unparseable
])
def test_every_branch(tok, script, stages, flagged, n_attempts):
    _, builder = build(tok, {"alpha": script})
    [s] = builder.run(rows("alpha question"))
    assert s.stages_used == stages and s.flagged is flagged and len(s.attempts) == n_attempts
    assert [a.stages for a in s.attempts] == [["answer"], ["analysis", "answer"],
                                              ["analysis", "guidance", "answer"]][:n_attempts]
    assert s.answer == "answer for alpha" and s.error is None
    if script[0] == "Once upon a":
        assert [a.verdict for a in s.attempts] == ["unparseable"] * 3


def test_one_engine_call_per_step_for_all_prompts_and_mixed_stages(tok):
    engine, builder = build(tok, {"alpha": ["SAFE"], "beta": ["UNSAFE", "SAFE"], "gamma": ["SAFE"]})
    builder.run(rows("alpha", "beta"))
    assert engine.calls[:3] == [["answer", "answer"], ["check", "check"], ["analysis"]]
    engine, builder = build(tok, {"alpha": ["SAFE"], "beta": ["UNSAFE", "SAFE"], "gamma": ["SAFE"]})
    builder.run(rows("beta", "alpha", "gamma"), max_active=2)
    assert ["analysis", "answer"] in engine.calls  # beta's analysis beside gamma's first answer


def test_prompt_that_cannot_fit_is_an_error_not_a_crash(tok):
    engine, builder = build(tok, {"alpha": ["SAFE"], "beta": ["SAFE"]}, max_model_len=300)
    long = "beta " + "word " * 200
    states = builder.run(rows("alpha", long))
    assert states[0].error is None and states[0].flagged is False
    assert states[1].error and "max_model_len=300" in states[1].error and states[1].flagged


def test_history_is_clipped_to_recent_turns(tok):
    _, builder = build(tok, {"alpha": ["SAFE"]})
    builder.history_tokens = 40  # each turn counts its text and the chat template's markers around it
    hist = [{"role": "user", "content": "old " * 30}, {"role": "assistant", "content": "old reply " * 10},
            {"role": "user", "content": "recent"}, {"role": "assistant", "content": "ok"}]
    [s] = builder.start([{"id": "x", "question": "alpha", "history": hist}])
    assert s.history == hist[2:]


def test_advance_is_pure_bookkeeping():
    s = ChainState(id="x", history=[], question="q")
    advance(s, Stage.ANSWER, "a1")
    assert s.next is Stage.CHECK
    advance(s, Stage.CHECK, "UNSAFE")
    assert s.next is Stage.ANALYSIS and s.attempts[-1].verdict == "unsafe"


def test_real_engine_builds_recorded_chains(tiny_model):
    """The real tiny model writes stories: its self-checks are unparseable, so it walks every stage."""
    from mote_ray.engines import create_engine

    engine = create_engine(EngineConfig(model=tiny_model, engine="transformers"))
    builder = ChainBuilder(engine, Templates(), MAX, SamplingParams())
    states = builder.run(rows("How do I pick a lock?", "Give three tips for staying healthy."))
    for s in states:
        # Walking every stage means the first two self-checks were not "safe"; each verdict is the
        # parse of the check text the model wrote.
        assert len(s.attempts) == 3 and all(a.verdict == parse_verdict(a.check_text) for a in s.attempts)
        assert all(a.verdict != "safe" for a in s.attempts[:2])
        assert s.analysis and s.guidance and s.answer == s.attempts[-1].answer
        assert s.stage_tokens["check"] <= 3 * MAX["check"] and s.completion_tokens > 0


def test_each_request_has_its_own_seed_and_keeps_it_across_runs(tok):
    """One seed on every request made all rows of a batch draw the same random numbers."""
    def seeds(questions):
        engine, builder = build(tok, {q: ["UNSAFE", "UNSAFE", "SAFE"] for q in questions})
        seen, generate = {}, engine.generate

        def record(reqs):  # key: (request id, how many times that id was asked before)
            for r in reqs:
                seen[(r.id, sum(k[0] == r.id for k in seen))] = r.sampling.seed
            return generate(reqs)

        engine.generate = record
        builder.sampling = SamplingParams(temperature=1.0, seed=7)
        builder.run(rows(*questions))
        return seen

    both = seeds(["alpha", "beta"])
    assert len(set(both.values())) == len(both) == 2 * 8  # 3 answers + 3 checks + analysis + guidance each
    alone = seeds(["alpha"])
    assert all(both[k] == v for k, v in alone.items())  # q0 ("alpha") samples alike with or without beta


def test_sampled_chains_do_not_depend_on_batch_neighbours_on_a_real_engine(tiny_model):
    from mote_ray.engines import create_engine

    engine = create_engine(EngineConfig(model=tiny_model, engine="transformers"))
    builder = ChainBuilder(engine, Templates(), MAX, SamplingParams(temperature=1.0, seed=3))
    texts = (lambda states: [(s.analysis, s.guidance, s.answer) for s in states])
    alone = texts(builder.run([{"id": "a", "question": "Tell me a story.", "history": []}]))
    pair = texts(builder.run([{"id": "b", "question": "Tell me a story.", "history": []},
                              {"id": "a", "question": "Tell me a story.", "history": []}]))
    assert pair[1] == alone[0]  # the same request, another neighbour: the same tokens
    assert pair[0] != pair[1]  # the same question under another id draws its own sample
    longer = {"id": "c", "question": "Once upon a time there was a little dog who " * 3,
              "history": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]}
    assert texts(builder.run([longer, {"id": "a", "question": "Tell me a story.", "history": []}]))[1] == alone[0]
