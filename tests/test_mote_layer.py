"""The MoTE layer, routing and masks against hand computation; save/load; export parity."""

import pytest
import torch
from torch import nn

from mote_ray.mote.layer import MoTELinear, RoutingState
from mote_ray.mote.model import MoTEConfig, build_mote_model
from mote_ray.mote.routing import EXPERTS, NO_STAGE, expert_index, skip_mask, skip_plan, stage_ids, stage_token_ids

from .conftest import requires_vllm


def _layer(alpha=0.5, r=4, n=3):
    torch.manual_seed(0)
    routing = RoutingState()
    layer = MoTELinear(nn.Linear(6, 5), n, r, lora_alpha=8.0, alpha=alpha, routing=routing)
    nn.init.normal_(layer.lora_B)  # B starts at zero; make every expert non-trivial
    return layer, routing


def test_layer_equals_the_formula_on_a_mixed_batch():
    layer, routing = _layer(alpha=0.3)
    x = torch.randn(2, 5, 6)
    idx = torch.tensor([[0, 1, 2, 0, 1], [2, 2, 1, 0, 0]])
    routing.set(idx)
    got = layer(x)
    s = layer.scaling
    for b in range(2):
        for t in range(5):
            e = idx[b, t]
            stage = layer.lora_B[:, e] @ (layer.lora_A[e] @ x[b, t])
            shared = layer.lora_B[:, -1] @ (layer.lora_A[-1] @ x[b, t])
            want = layer.base(x[b, t]) + s * (0.3 * stage + 0.7 * shared)
            assert torch.allclose(got[b, t], want, atol=1e-5)


def test_gradients_reach_only_the_experts_used():
    layer, routing = _layer()
    routing.set(torch.tensor([[0, 0, 2]]))
    layer(torch.randn(1, 3, 6)).sum().backward()
    used = [bool(layer.lora_A.grad[e].abs().sum() > 0) for e in range(4)]
    assert used == [True, False, True, True]  # analysis, guidance (unused), answer, shared
    assert layer.base.weight.grad is None


def test_routing_from_special_tokens_and_seeded_prompt_expert(tiny_model):
    model, tok = build_mote_model(tiny_model, MoTEConfig(r=2))
    ids = stage_token_ids(tok)
    seq = tok("Q? <|analysis|> a <|end_analysis|><|response|> b <|end_response|>")["input_ids"]
    st = stage_ids(seq, ids)
    first = seq.index(ids["analysis"][0])
    assert set(st[:first]) == {NO_STAGE} and st[first] == 0 and st[seq.index(ids["analysis"][1])] == 0
    assert st[seq.index(ids["answer"][0])] == EXPERTS.index("answer") == st[-1]
    stages = torch.tensor([st] * 4)
    e1 = expert_index(stages, "random", torch.Generator().manual_seed(3))
    e2 = expert_index(stages, "random", torch.Generator().manual_seed(3))
    assert torch.equal(e1, e2) and (e1[:, first:] == stages[:, first:]).all()
    assert (expert_index(stages, "guidance")[:, :first] == 1).all()


def test_skip_mask_hides_exactly_the_intended_spans():
    # q q A A G G R R pad
    stages = torch.tensor([[-1, -1, 0, 0, 1, 1, 2, 2, -1]])
    att = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    full = skip_mask(stages, att, 0.0)[0, 0]
    assert torch.equal(full, torch.tril(torch.ones(9, 9, dtype=torch.bool)) & att.bool())
    hidden = skip_mask(stages, att, 1.0)[0, 0]  # every later span loses every earlier span
    assert not hidden[6:8, 2:6].any() and not hidden[4:6, 2:4].any()
    assert hidden[6:8, 0:2].all() and hidden[6, 6] and hidden[7, 6:8].all()  # question and own span stay
    assert torch.equal(hidden & ~full, torch.zeros_like(full))
    g = torch.Generator().manual_seed(1)
    some = skip_mask(stages.repeat(64, 1), att.repeat(64, 1), 0.5, g)
    frac = (~some[:, 0, 7, 2]).float().mean()  # answer -> analysis hidden about half the time
    assert 0.25 < frac < 0.75


def test_a_skipped_stage_is_hidden_from_every_later_span_of_the_sample():
    # The old mask hid each (later, earlier) pair independently: the answer could lose the analysis
    # while the guidance still saw it, a chain that never occurs. A skip drops the stage for all.
    stages = torch.tensor([[-1, -1, 0, 0, 1, 1, 2, 2]]).repeat(256, 1)
    att = torch.ones_like(stages)
    mask = skip_plan(stages, att, 0.5, torch.Generator().manual_seed(0))[0][:, 0]
    guidance_sees_analysis = mask[:, 4, 2]
    answer_sees_analysis = mask[:, 6, 2]
    assert torch.equal(guidance_sees_analysis, answer_sees_analysis)
    assert 0 < (~answer_sees_analysis).sum() < 256  # both outcomes occur
    # The answer is never the skipped one, and a span always sees itself and the question.
    assert mask[:, 7, 6].all() and mask[:, 6:8, 0:2].all()


def test_masked_full_chain_computes_the_really_shortened_chain(tiny_model):
    model, tok = build_mote_model(tiny_model, MoTEConfig(r=4), seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() > 1:
                p.add_(torch.randn_like(p) * 0.05)  # experts non-trivial (B starts at 0)
    ids = stage_token_ids(tok)
    q = tok("How do I bake bread?")["input_ids"]
    a = [ids["analysis"][0]] + tok("It is safe.", add_special_tokens=False)["input_ids"] + [ids["analysis"][1]]
    g = [ids["guidance"][0]] + tok("Explain the steps.", add_special_tokens=False)["input_ids"] + [ids["guidance"][1]]
    r = [ids["answer"][0]] + tok("Mix flour and water.", add_special_tokens=False)["input_ids"] + [ids["answer"][1]]

    def run(seq, drop=None):
        st = torch.tensor([stage_ids(seq, ids)])
        mask, pos = skip_plan(st, torch.ones_like(st), 0.0, drop=drop)
        with torch.no_grad():
            return model(torch.tensor([seq]), expert_index(st, "answer"), attention_mask=mask, position_ids=pos).logits[0]

    full = run(q + a + g + r, drop=torch.tensor([[True, False, False]]))  # skip the analysis
    short = run(q + g + r)  # the chain written without it
    n = len(q) + len(a)
    torch.testing.assert_close(full[n:], short[len(q):], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full[:len(q)], short[:len(q)], rtol=1e-4, atol=1e-4)
    # With the gap left open (positions unchanged) the later spans would differ: the test can fail.
    st = torch.tensor([stage_ids(q + a + g + r, ids)])
    mask, _ = skip_plan(st, torch.ones_like(st), 0.0, drop=torch.tensor([[True, False, False]]))
    with torch.no_grad():
        gap = model(torch.tensor([q + a + g + r]), expert_index(st, "answer"), attention_mask=mask).logits[0]
    assert not torch.allclose(gap[n:], short[len(q):], atol=1e-3)


def test_save_load_gives_identical_logits(tiny_model, tmp_path):
    from mote_ray.mote.export import load_mote, save_base, save_mote

    model, tok = build_mote_model(tiny_model, MoTEConfig(r=4))
    for m in model.mote_layers():
        nn.init.normal_(m.lora_B, std=0.02)
    ids = torch.tensor([tok("Once upon a time <|analysis|> yes")["input_ids"]])
    idx = torch.randint(0, 3, ids.shape)
    before = model(ids, idx).logits
    base = save_base(model, tok, tmp_path / "base")
    save_mote(model, tmp_path / "mote", base)
    loaded, _ = load_mote(tmp_path)
    assert torch.allclose(before, loaded(ids, idx).logits, atol=1e-5)


@pytest.fixture(scope="module")
def exported(tiny_model_hd32, tmp_path_factory):
    from mote_ray.mote.export import export_adapters, save_base

    out = tmp_path_factory.mktemp("export")
    model, tok = build_mote_model(tiny_model_hd32, MoTEConfig(r=4, alpha=0.3))
    torch.manual_seed(1)
    for m in model.mote_layers():
        nn.init.normal_(m.lora_B, std=0.05)
    base = save_base(model, tok, out / "base")
    adapters = export_adapters(model, tok, out / "adapters", base)
    return model.eval(), tok, adapters, base


def test_exported_adapters_match_the_stage_restricted_model_in_peft(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok, adapters, base = exported
    ids = torch.tensor([tok("Lily went to the park <|response|> and")["input_ids"]])
    for e, stage in enumerate(EXPERTS):
        want = model(ids, torch.full_like(ids, e)).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[stage]).eval()
        with torch.no_grad():
            got = peft(input_ids=ids).logits
        assert torch.allclose(want, got, atol=1e-4), stage


@requires_vllm
def test_exported_adapters_run_in_vllm_like_in_transformers(exported):
    from mote_ray.config import EngineConfig
    from mote_ray.engines import create_engine
    from mote_ray.records import GenerationRequest, SamplingParams

    _, _, adapters, base = exported
    reqs = [GenerationRequest(id=s, prompt="Once upon a time", adapter=s, sampling=SamplingParams(max_tokens=16))
            for s in EXPERTS]
    outs = {}
    for name in ("transformers", "vllm"):
        engine = create_engine(EngineConfig(model=str(base), engine=name, enable_lora=True, max_lora_rank=8))
        for s in EXPERTS:
            engine.load_adapter(s, str(adapters[s]))
        outs[name] = [r.token_ids for r in engine.generate(reqs)]
        engine.close()
    assert outs["transformers"] == outs["vllm"]
