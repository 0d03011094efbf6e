"""Exact MoTE inference: the chain rules, the reference against training, vLLM against the reference."""

from __future__ import annotations

import pytest
import torch

from mote_ray.mote.chain import ChainSpec, StageResult, chain, run_chains
from mote_ray.mote.routing import EXPERTS

from .conftest import requires_vllm

MODES = ("adaptive", "direct", "analysis", "full")
IDS = {"analysis": (100, 101), "guidance": (102, 103), "answer": (104, 105)}
SPEC = ChainSpec(IDS, eos=2, prompt_expert="answer")


def _decode(ids):
    return " ".join(map(str, ids))


def _script(*results):
    """A stage runner that answers the chain's requests from a script, recording them (control flow only)."""
    seen, queue = [], list(results)

    def run(reqs):
        seen.extend(reqs)
        return [queue.pop(0) for _ in reqs]

    return run, seen


def test_forced_plan_tags_every_token_with_its_expert_and_forces_end_at_the_limit():
    run, seen = _script(StageResult([7, 8, 9], "length"), StageResult([5], "stop", stop_token=105))
    out = run_chains(run, [chain(SPEC, [1, 3], _decode, mode="analysis", limits={"analysis": 3})])[0]
    assert out.token_ids == [100, 7, 8, 9, 101, 104, 5, 105] and list(out.stages) == ["analysis", "answer"]
    a, b = seen
    assert a.expert == EXPERTS.index("analysis") and a.max_tokens == 3 and a.stop_ids == (101, 2)
    assert 101 not in a.banned and {100, 102, 103, 104, 105} <= set(a.banned)
    # The answer request reads the prompt with the prompt expert and the analysis span with its own.
    assert b.tokens == (1, 3, 100, 7, 8, 9, 101, 104)
    assert b.experts == (2, 2, 0, 0, 0, 0, 0, 2)
    assert out.finish_reason == "stop" and out.stage_tokens == {"analysis": 3, "answer": 1}


def test_adaptive_choice_is_a_one_token_request_over_later_start_tokens():
    run, seen = _script(StageResult([102]), StageResult([4], "stop", stop_token=103), StageResult([104]),
                        StageResult([], "stop", stop_token=2))
    out = run_chains(run, [chain(SPEC, [1], _decode, mode="adaptive")])[0]
    choice1, _, choice2, _ = seen
    assert choice1.choices == ((100, 0), (102, 1), (104, 2)) and choice1.max_tokens == 1 and choice1.expert is None
    assert choice2.choices == ((104, 2),)  # only stages after guidance remain
    assert list(out.stages) == ["guidance", "answer"] and out.token_ids[-1] == 2  # EOS closes the chain


def test_openai_budget_stop_strings_and_context_room():
    run, seen = _script(StageResult([11, 12, 13, 14], "length"))
    out = run_chains(run, [chain(SPEC, [1], lambda ids: "abcSTOPdef", mode="direct", max_tokens=6, stop=["STOP"])])[0]
    assert seen[0].max_tokens == 4  # 6 for the completion: start + 4 + end
    assert out.answer == "abc" and out.finish_reason == "stop" and len(out.token_ids) == 6
    run, seen = _script(StageResult([11], "length"))
    out = run_chains(run, [chain(ChainSpec(IDS, 2, "answer", max_len=10), list(range(7)), _decode, mode="direct")])[0]
    assert seen[0].max_tokens == 1 and out.finish_reason == "length"  # 7 prompt + start + 1 + end = 10


PROMPTS = ["Once upon a time", "The cat sat", "Lily and Tom went to the park", "A big red"]


@pytest.mark.parametrize("mode", MODES)
def test_reference_decoding_equals_the_training_forward(random_mote, mode):
    """The oracle checked against training: the batched, KV-cached reference picks, at every position
    it chose freely (stage text, stage ends, EOS, adaptive stage choices), the argmax of the training
    forward (whole sequence, experts from the stage spans) over what was allowed there; and its
    incremental logits equal that forward's."""
    from mote_ray.mote.generate import MoTEGenerator
    from mote_ray.mote.routing import expert_index, stage_ids

    model, tok = random_mote
    gen = MoTEGenerator(model, tok)
    limits = {"analysis": 12, "guidance": 12, "answer": 16}
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    outs = gen.generate_many(prompts, mode=mode, limits=limits)  # one padded batch per round
    ids_of = gen.spec.stage_ids
    start_of = {s: st for st, (s, _) in ids_of.items()}
    specials = [t for pair in ids_of.values() for t in pair]
    checked = 0
    for ids, out in zip(prompts, outs):
        seq = ids + out.token_ids
        experts = expert_index(torch.tensor([stage_ids(seq, ids_of)]), prompt_expert="answer")
        with torch.no_grad():
            full = model(torch.tensor([seq]), experts).logits[0].float()
        stage, count, done = None, 0, []
        for pos in range(len(ids) - 1, len(seq) - 1):
            nxt = seq[pos + 1]
            if stage is None:  # between stages: a start token comes next
                later = [s for s in EXPERTS if EXPERTS.index(s) > max((EXPERTS.index(d) for d in done), default=-1)]
                if mode == "adaptive":  # chosen by the expert that read the last token
                    allowed = [ids_of[s][0] for s in later]
                    assert allowed[int(full[pos, allowed].argmax())] == nxt, (mode, pos)
                    checked += 1
                stage, count = start_of[nxt], 0
                continue
            if count < limits[stage]:  # a free pick: everything but the other stage tokens
                row = full[pos].clone()
                row[[t for t in specials if t != ids_of[stage][1]]] = float("-inf")
                assert int(row.argmax()) == nxt, (mode, pos)
                checked += 1
            if nxt == ids_of[stage][1]:
                done.append(stage)
                stage = None
            elif nxt != tok.eos_token_id:
                count += 1
        incremental = gen.engine.logits(seq, experts[0].tolist())
        assert (full - incremental).abs().max() < 1e-2  # fp32 summation order only
    assert checked >= 4 * len(prompts)  # every chain had free picks to check
    wrong = gen.engine.logits(seq, [EXPERTS.index("analysis")] * len(seq))  # every token read by one other expert
    assert (full - wrong).abs().max() > 0.5  # so the logits check can tell routings apart


def test_batched_reference_rows_do_not_depend_on_their_neighbours(random_mote):
    from mote_ray.mote.generate import MoTEGenerator

    model, tok = random_mote
    gen = MoTEGenerator(model, tok)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    limits = {"analysis": 12, "guidance": 12, "answer": 16}
    for kw in ({}, {"temperature": 0.8, "seed": 7}):
        batched = gen.generate_many(prompts, "full", limits, **kw)
        alone = [gen.generate(p, "full", limits, **kw) for p in prompts]
        assert [o.token_ids for o in batched] == [o.token_ids for o in alone], kw


def test_vllm_dir_holds_the_experts_under_their_layer_names(random_mote_dir):
    import json

    from safetensors.torch import load_file

    from mote_ray.mote.vllm_dir import ensure_vllm_dir

    d = ensure_vllm_dir(random_mote_dir)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["MoTEForCausalLM"] and cfg["vocab_size"] == 3 * cfg["mote"]["base_vocab_size"]
    assert set(cfg["mote"]["targets"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    experts = load_file(d / "mote_experts.safetensors")
    assert "mote_expert.model.layers.0.self_attn.q_proj.lora_A" in experts and len(experts) == 5 * 7 * 2
    assert (d / "model.safetensors").resolve() == (random_mote_dir / "base" / "model.safetensors").resolve()


@requires_vllm
@pytest.mark.vllm
def test_vllm_mote_engine_matches_the_reference_at_long_budgets(random_mote_dir):
    """The vLLM MoTE model (plugin class, expert-tagged ids, logits processor, prefix cache) gives the
    reference's greedy token sequences, stage tokens included, in every mode."""
    import subprocess
    import sys

    code = f"""
import json
from mote_ray.mote.offline import OfflineMoTE
if __name__ == "__main__":
    v, r = OfflineMoTE({str(random_mote_dir)!r}, "vllm"), OfflineMoTE({str(random_mote_dir)!r}, "transformers")
    prompts = [v.encode_chat(p) for p in {PROMPTS!r}]
    limits = {{"analysis": 96, "guidance": 96, "answer": 128}}
    res = {{}}
    for mode in {MODES!r}:
        a, b = v.generate_many(prompts, mode, limits), r.generate_many(prompts, mode, limits)
        res[mode] = [[x.token_ids, y.token_ids, x.cached_tokens] for x, y in zip(a, b)]
    print("RESULT" + json.dumps(res))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    import json

    res = json.loads(line[6:])
    pairs = [(v, r) for mode in MODES for v, r, _ in res[mode]]
    same = sum(v == r for v, r in pairs)
    tokens = sum(max(len(v), len(r)) for v, r in pairs)
    agree = sum(x == y for v, r in pairs for x, y in zip(v, r))
    assert same == len(pairs) and agree == tokens, (same, len(pairs), agree / tokens)  # fp32 CPU: measured exact
    assert sum(len(v) for v, _ in pairs) > 200  # long chains, not a few tokens each
    assert sum(c for _, _, c in res["full"]) > 0  # later stages reuse the earlier stages' KV


@pytest.mark.gpu
def test_vllm_mote_plugin_on_gpu_v2_runner(tmp_path):
    """GPU (V2 runner by default): a randomly initialised Qwen2-0.5B-shaped MoTE model loads through the
    plugin and gives the reference's greedy tokens; the speed is printed for the benchmark record."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("vllm")
    import json
    import subprocess
    import sys

    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from mote_ray.mote.export import save_base, save_mote
    from mote_ray.mote.model import MoTEConfig, MoTEModel, add_stage_tokens

    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(cfg)
    tok = AutoTokenizer.from_pretrained(__import__("mote_ray.models", fromlist=["x"]).resolve_model(None).path)
    first = add_stage_tokens(lm, tok)
    model = MoTEModel(lm, MoTEConfig(r=16), first)
    with torch.no_grad():
        for m in model.mote_layers():
            m.lora_B.normal_(0, 0.02)
    save_mote(model, tmp_path / "mote", save_base(model, tok, tmp_path / "base"))
    code = f"""
import json, time
from mote_ray.mote.offline import OfflineMoTE
if __name__ == "__main__":
    v = OfflineMoTE({str(tmp_path)!r}, "vllm", dtype="float32")  # fp32 on both sides: agreement, not bf16 noise
    prompts = [v.encode_chat(f"Question {{i}}: how do I stay safe online?") for i in range(64)]
    t = time.time(); a = v.generate_many(prompts, "full", {{"analysis": 128, "guidance": 128, "answer": 256}})
    wall = time.time() - t
    r = OfflineMoTE({str(tmp_path)!r}, "transformers").generate_many(prompts[:8], "full", {{"analysis": 32, "guidance": 32, "answer": 32}})
    b = v.generate_many(prompts[:8], "full", {{"analysis": 32, "guidance": 32, "answer": 32}})
    print("RESULT" + json.dumps({{"tokens_per_s": sum(len(o.token_ids) for o in a) / wall,
                                  "same": sum(x.token_ids == y.token_ids for x, y in zip(b, r))}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line, proc.stderr[-3000:]
    res = json.loads(line[6:])
    print(res)
    assert res["same"] >= 7


def test_chat_cli_says_its_engine_and_prints_json_last(random_mote_dir):
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mote_ray.cli", "chat", "--model", str(random_mote_dir), "--engine",
                           "transformers", "--mode", "full", "--max-tokens", "8", "--json", "Once upon a time"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(last["stages"]) == ["analysis", "guidance", "answer"] and last["answer"] == last["stages"]["answer"]
    assert last["engine"] == "transformers" and "engine transformers" in proc.stderr


def test_a_chain_without_room_for_a_stage_ends_at_once_offline_and_served():
    import asyncio

    from mote_ray.mote.chain import drive

    async def never(req):
        raise AssertionError("no stage request expected")

    for budget in (1, 2):  # start + end of a stage need 2 of max_tokens: nothing fits
        out = run_chains(lambda reqs: [], [chain(SPEC, [1], _decode, mode="direct", max_tokens=budget)])[0]
        assert out.finish_reason == "length" and out.token_ids == [] and out.answer == ""
        # the old drive let the StopIteration escape its coroutine: "RuntimeError: coroutine raised StopIteration"
        out = asyncio.run(drive(never, chain(SPEC, [1], _decode, mode="adaptive", max_tokens=budget)))
        assert out.finish_reason == "length" and out.stages == {}
