"""vLLM and transformers on the same model give the same greedy tokens, with and without a LoRA."""

import pytest

from mote_ray.config import EngineConfig
from mote_ray.engines import create_engine
from mote_ray.records import GenerationRequest, SamplingParams

from .conftest import requires_vllm

pytestmark = [requires_vllm, pytest.mark.vllm]

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park. They saw a", "Tim had a red ball."]


@pytest.fixture(scope="module")
def random_lora(tiny_model_hd32, tmp_path_factory):
    """A real PEFT adapter with non-zero weights (r=8 on q_proj/v_proj), saved in PEFT's format."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_hd32)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    out = tmp_path_factory.mktemp("lora")
    peft_model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def engines(tiny_model_hd32, random_lora):
    built = {}
    for name in ("transformers", "vllm"):
        e = create_engine(EngineConfig(model=tiny_model_hd32, engine=name, enable_lora=True, max_lora_rank=8))
        e.load_adapter("story", random_lora)
        built[name] = e
    yield built
    for e in built.values():
        e.close()


def _requests(adapter=None, chat=False):
    def one(i, p):
        body = {"messages": [{"role": "user", "content": p}]} if chat else {"prompt": p}
        return GenerationRequest(id=str(i), sampling=SamplingParams(max_tokens=32), adapter=adapter, **body)
    return [one(i, p) for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("chat", [False, True])
def test_greedy_tokens_agree(engines, chat):
    hf = engines["transformers"].generate(_requests(chat=chat))
    vl = engines["vllm"].generate(_requests(chat=chat))
    assert [r.token_ids for r in hf] == [r.token_ids for r in vl]
    assert [(r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in hf] == \
           [(r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in vl]
    assert {r.engine for r in vl} == {"vllm"}


def test_lora_changes_output_identically(engines):
    base = engines["vllm"].generate(_requests())
    hf = engines["transformers"].generate(_requests(adapter="story"))
    vl = engines["vllm"].generate(_requests(adapter="story"))
    assert [r.token_ids for r in hf] == [r.token_ids for r in vl]
    assert [r.token_ids for r in vl] != [r.token_ids for r in base]


def test_mixed_adapter_batch_equals_separate_calls(engines):
    mixed = [r if i % 2 else r.model_copy(update={"adapter": "story"}) for i, r in enumerate(_requests())]
    for e in engines.values():
        got = e.generate(mixed)
        want = [e.generate([r])[0] for r in mixed]
        assert [r.token_ids for r in got] == [r.token_ids for r in want], e.name
