import hashlib
from pathlib import Path

import pytest

from mote_ray.chat import FALLBACK_CHAT_TEMPLATE, encode, load_tokenizer, render
from mote_ray.errors import ModelNotFoundError
from mote_ray.models import DEFAULT_MODEL_NAME, build_tiny_model, resolve_model
from mote_ray.records import GenerationRequest


def test_missing_local_path_is_one_clear_error():
    with pytest.raises(ModelNotFoundError, match="/nonexistent/model"):
        resolve_model("/nonexistent/model")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


def test_unreachable_hub_id_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="could not be fetched"):
        resolve_model("no-such-org/no-such-model-xyz")


def test_env_model_is_used(monkeypatch, tiny_model):
    monkeypatch.setenv("MOTE_MODEL", tiny_model)
    m = resolve_model(None)
    assert (m.path, m.source) == (tiny_model, "env")


def test_gguf_file_resolution(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    m = resolve_model(str(tmp_path / "m.gguf"))
    assert m.gguf_file == "m.gguf" and m.weights == str(tmp_path / "m.gguf")
    with pytest.raises(ModelNotFoundError, match="other.gguf"):
        resolve_model(str(tmp_path), gguf_file="other.gguf")


def test_offline_default_is_deterministic_and_complete(tmp_path):
    a = build_tiny_model(tmp_path / "a")
    b = build_tiny_model(tmp_path / "b")
    assert a == b == hashlib.sha256((tmp_path / "a" / "model.safetensors").read_bytes()).hexdigest()
    m = resolve_model(None)
    assert m.source == "offline-default" and m.name == DEFAULT_MODEL_NAME
    tok = load_tokenizer(m)
    assert tok.chat_template and tok.eos_token_id == 2
    text = "Hi!\nHow are you?"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert m.hf_config()["head_dim"] >= 32  # loadable by vLLM on CPU


def test_fallback_template_for_models_without_one(tiny_model):
    tok = load_tokenizer(resolve_model(tiny_model))
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE and tok.pad_token_id is not None
    req = GenerationRequest(messages=[{"role": "system", "content": "Be safe."}, {"role": "user", "content": "Hi"}])
    assert render(tok, req) == "### System:\nBe safe.\n\n### User:\nHi\n\n### Assistant:\n"
    cont = GenerationRequest(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well"}],
                             continue_final=True)
    assert render(tok, cont).endswith("### Assistant:\nWell")
    ids = encode(tok, req)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
