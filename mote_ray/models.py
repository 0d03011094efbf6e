"""Model resolution: a Hugging Face id, a local directory, a GGUF file, or the offline default.

The offline default is a tiny Llama built deterministically from a seed (random weights, a
byte-level tokenizer, a chat template) so every command runs on a machine with no hub and no
files. It exercises mechanics only; point `--model` or $MOTE_MODEL at a real model for real work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mote_ray.errors import ModelNotFoundError

DEFAULT_MODEL_NAME = "mote-tiny-llama-v1"
ENV_MODEL = "MOTE_MODEL"


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # local directory holding config + tokenizer (+ weights, or the gguf file)
    name: str  # what to show users and record in outputs
    source: Literal["argument", "env", "offline-default", "hub"]
    gguf_file: str | None = None

    @property
    def weights(self) -> str:
        """What vLLM's `model=` takes: the directory, or the .gguf file itself."""
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path

    def hf_config(self) -> dict:
        cfg = Path(self.path) / "config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else {}


def mote_home() -> Path:
    return Path(os.environ.get("MOTE_HOME", Path.home() / ".cache" / "mote-ray"))


def resolve_model(spec: str | None, gguf_file: str | None = None) -> ResolvedModel:
    """Turn what the user gave into a local directory, or raise ModelNotFoundError saying why."""
    source: Literal["argument", "env"] = "argument"
    if spec is None and os.environ.get(ENV_MODEL):
        spec, source = os.environ[ENV_MODEL], "env"
    if spec is None:
        return ResolvedModel(str(ensure_default_model()), DEFAULT_MODEL_NAME, "offline-default")

    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ResolvedModel(str(p.parent), spec, source, gguf_file=p.name)
    if p.is_dir():
        if gguf_file is None and not (p / "config.json").is_file():
            raise ModelNotFoundError(f"{spec} is a directory but holds no config.json (not a Hugging Face model folder)")
        if gguf_file and not (p / gguf_file).is_file():
            raise ModelNotFoundError(f"gguf file {gguf_file!r} not found in {spec}")
        return ResolvedModel(str(p), spec, source, gguf_file=gguf_file)
    if spec.startswith(("/", ".", "~")) or os.sep + os.sep in spec or spec.count("/") > 1:
        raise ModelNotFoundError(f"model not found: {spec} (no such directory or .gguf file)")
    return ResolvedModel(_download(spec, gguf_file), spec, "hub", gguf_file=gguf_file)


def _download(repo_id: str, gguf_file: str | None) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.model", "*.txt", "*.jinja"] + ([gguf_file] if gguf_file else ["*.safetensors"])
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:  # the hub raises a dozen types; all mean "cannot get it"
        raise ModelNotFoundError(
            f"model not found: {repo_id!r} is not a local directory and could not be fetched from the "
            f"Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:160]}). "
            f"Give a local path, or run without --model to use the offline default."
        ) from None


# ---------------------------------------------------------------- the offline default model

_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=512)  # head_dim 32: vLLM CPU minimum
_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def ensure_default_model() -> Path:
    """Build the offline default once (atomically) under $MOTE_HOME and return its directory."""
    target = mote_home() / "models" / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    try:
        build_tiny_model(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_model(out: Path, seed: int = 0) -> str:
    """Write a seeded tiny Llama + byte-level tokenizer + chat template to `out`; returns its sha256."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mote_ray.chat import FALLBACK_CHAT_TEMPLATE

    tok = _byte_tokenizer()
    tok.chat_template = FALLBACK_CHAT_TEMPLATE
    tok.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=3,
                      tie_word_embeddings=False, **_TINY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).float()
    model.generation_config.pad_token_id = 3
    model.save_pretrained(out)
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (out / "README.md").write_text(
        f"# {DEFAULT_MODEL_NAME}\nBuilt by mote-ray from seed {seed}: random weights, byte-level tokenizer.\n"
        "It runs every mechanism offline and writes noise; use --model for real work.\n"
        f"model.safetensors sha256: {digest}\n"
    )
    return digest


def _byte_tokenizer():
    """GPT-2 style byte-level BPE with no merges over printable ASCII + newline (others -> <unk>).

    Random weights then still print readable characters: no token decodes to a broken UTF-8 byte.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = _gpt2_byte_chars()
    vocab = {s: i for i, s in enumerate(_SPECIALS)}
    for b in [0x0A, *range(0x20, 0x7F)]:
        vocab[byte_to_char[b]] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-char map, which the ByteLevel pre-tokenizer uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def worker_path(model: str | None) -> str:
    """The resolved model as Ray workers can open it: local paths made absolute (workers run elsewhere)."""
    path = resolve_model(model).path
    return str(Path(path).resolve()) if Path(path).exists() else path
