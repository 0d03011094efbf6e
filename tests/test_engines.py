"""Real engines on the real tiny model: transformers here; vLLM parity in test_vllm_parity.py."""

import pytest

from mote_ray.config import EngineConfig
from mote_ray.engines import choose_engine, create_engine
from mote_ray.engines.common import PromptTooLongError
from mote_ray.errors import MoteError, UnsupportedModelError
from mote_ray.models import resolve_model
from mote_ray.records import GenerationRequest, SamplingParams

from .conftest import requires_vllm

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park. They saw a"]


@pytest.fixture(scope="module")
def hf(tiny_model):
    engine = create_engine(EngineConfig(model=tiny_model, engine="transformers", batch_size=8))
    yield engine
    engine.close()


def _reqs(prompts, **sampling):
    return [GenerationRequest(id=str(i), prompt=p, sampling=SamplingParams(**sampling)) for i, p in enumerate(prompts)]


def test_generates_the_known_story(hf):
    [res] = hf.generate(_reqs(["Once upon a time"], max_tokens=20))
    # llama2.c's published sample for stories260K (doc/stories260K.md)
    assert res.text.startswith(", there was a little girl named Lily. She loved to play")
    assert res.completion_tokens == 20 and res.finish_reason == "length" and res.engine == "transformers"
    assert res.prompt_tokens == 5


def test_left_padded_batch_equals_one_by_one(hf):
    batched = hf.generate(_reqs(PROMPTS, max_tokens=24))
    single = [hf.generate(_reqs([p], max_tokens=24))[0] for p in PROMPTS]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.id for r in batched] == ["0", "1", "2"]


def test_per_request_sampling_in_one_call(hf):
    reqs = [GenerationRequest(id="g", prompt=PROMPTS[0], sampling=SamplingParams(max_tokens=8)),
            GenerationRequest(id="s1", prompt=PROMPTS[0], sampling=SamplingParams(max_tokens=12, temperature=1.0, seed=7)),
            GenerationRequest(id="s2", prompt=PROMPTS[0], sampling=SamplingParams(max_tokens=12, temperature=1.0, seed=7))]
    g, s1, s2 = hf.generate(reqs)
    assert g.completion_tokens == 8 and s1.completion_tokens == 12
    again = hf.generate(reqs)
    assert [r.token_ids for r in again] == [g.token_ids, s1.token_ids, s2.token_ids]  # seeded: reproducible


def test_stop_strings_and_context_cap(tiny_model):
    engine = create_engine(EngineConfig(model=tiny_model, engine="transformers", max_model_len=24))
    [r] = engine.generate(_reqs(["Once upon a time"], max_tokens=64, stop=["Lily"]))
    assert r.finish_reason == "stop" and "Lily" not in r.text and r.text.endswith("named ")
    [r] = engine.generate(_reqs(["Once upon a time"], max_tokens=64))
    assert r.prompt_tokens + r.completion_tokens == 24 and r.finish_reason == "length"
    with pytest.raises(PromptTooLongError, match="max_model_len=24"):
        engine.generate(_reqs(["Once upon a time " * 10]))


def test_chat_messages_use_the_template(hf):
    [r] = hf.generate([GenerationRequest(messages=[{"role": "user", "content": "Tell me a story"}],
                                         sampling=SamplingParams(max_tokens=6))])
    assert r.prompt_tokens > 8 and r.completion_tokens >= 1


def test_unknown_adapter_is_a_clear_error(hf):
    with pytest.raises(MoteError, match="not loaded"):
        hf.generate([GenerationRequest(prompt="x", adapter="nope")])
    with pytest.raises(MoteError, match="cannot load adapter"):
        hf.load_adapter("bad", "/nonexistent/adapter")


def test_auto_explains_its_choice(tiny_model, tiny_model_hd32):
    narrow = choose_engine(EngineConfig(device="cpu"), resolve_model(tiny_model))
    assert narrow.name == "transformers" and "head_dim" in narrow.reason
    with pytest.raises(UnsupportedModelError, match="head_dim=8"):
        choose_engine(EngineConfig(engine="vllm", device="cpu"), resolve_model(tiny_model))


def test_unloadable_model_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-arch", "architectures": ["NoSuchLM"]}')
    with pytest.raises(MoteError):
        create_engine(EngineConfig(model=str(tmp_path), engine="transformers"))


def test_a_seeded_request_samples_the_same_whatever_its_batch_neighbours(hf):
    def seeded(i, prompt, seed):
        return GenerationRequest(id=str(i), prompt=prompt, sampling=SamplingParams(max_tokens=16, temperature=1.0,
                                                                                   seed=seed))

    target = seeded(0, PROMPTS[0], 7)
    alone = hf.generate([target])[0].token_ids
    # Neighbours that sort before it (shorter prompts), after it, and share its batch.
    for neighbours in ([seeded(1, "A", 1), seeded(2, "The", 2)], [seeded(1, PROMPTS[2], 3)],
                       [seeded(i, p, 100 + i) for i, p in enumerate(PROMPTS * 3, 1)]):
        batch = hf.generate([*neighbours, target])
        assert batch[-1].token_ids == alone
    # Different seeds do differ (the seed is used, not ignored).
    others = {tuple(hf.generate([seeded(0, PROMPTS[0], s)])[0].token_ids) for s in range(4)}
    assert len(others) > 1


@pytest.mark.gpu
@pytest.mark.vllm
def test_vllm_seeds_each_request_on_gpu(tiny_model_hd32):
    """On CUDA, vLLM seeds every request (on CPU the engine-wide seed applies; see vllm_engine.py)."""
    pytest.importorskip("vllm")
    engine = create_engine(EngineConfig(model=tiny_model_hd32, engine="vllm", device="cuda",
                                        gpu_memory_utilization=0.3))
    try:
        def seeded(i, prompt, seed):
            return GenerationRequest(id=str(i), prompt=prompt,
                                     sampling=SamplingParams(max_tokens=16, temperature=1.0, seed=seed))

        alone = engine.generate([seeded(0, PROMPTS[0], 7)])[0].token_ids
        crowded = engine.generate([seeded(1, PROMPTS[1], 1), seeded(0, PROMPTS[0], 7), seeded(2, PROMPTS[2], 2)])
        assert crowded[1].token_ids == alone
        assert len({tuple(engine.generate([seeded(0, PROMPTS[0], s)])[0].token_ids) for s in range(4)}) > 1
    finally:
        engine.close()


@pytest.mark.vllm
@requires_vllm
def test_cpu_engine_core_runs_here_once_and_leaves_the_caller_as_it_was(tiny_model_hd32):
    """On CPU the first offline vLLM engine's core runs in this process (in_process_core); one
    built while it lives gets a process of its own, since closing the first tears down this
    process's vLLM state. Start-up leaves the caller's generators and torch.set_num_threads alone."""
    import os
    import random

    import numpy as np
    import torch

    from mote_ray.engines import vllm_engine

    assert vllm_engine._cores_here == 0, "an earlier test left an in-process vLLM engine open"
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    set_threads = torch.set_num_threads
    cfg = EngineConfig(model=tiny_model_hd32, engine="vllm")
    a = create_engine(cfg)
    b = create_engine(cfg)
    assert a.core_here and not b.core_here and vllm_engine._cores_here == 1
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2]) and torch.set_num_threads is set_threads
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    reqs = _reqs(["Once upon a time"], max_tokens=12, temperature=0.0)
    expected = a.generate(reqs)[0].token_ids
    a.close()
    assert b.generate(reqs)[0].token_ids == expected  # its own process: untouched by a's shutdown
    b.close()
    c = create_engine(cfg)  # alone again: here
    assert c.core_here and c.generate(reqs)[0].token_ids == expected
    c.close()
    assert vllm_engine._cores_here == 0
