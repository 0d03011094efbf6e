"""Prompt rendering shared by both engines: one function turns a request into token ids.

Both engines receive these ids (vLLM as `TokensPrompt`), so a chat template can never be
applied differently by the two. Models without a template get FALLBACK_CHAT_TEMPLATE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mote_ray.records import GenerationRequest

FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}### System:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ m['content'] }}{% if not loop.last %}\n\n{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def load_tokenizer(resolved):
    """The model's tokenizer, left-padded, with a pad token and a chat template guaranteed."""
    from transformers import AutoTokenizer

    from mote_ray.errors import UnsupportedModelError

    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(resolved.path, **kwargs)
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedModelError(f"cannot load a tokenizer for {resolved.name}: {str(e).splitlines()[0][:200]}") from None
    if not tok.chat_template:
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "left"
    return tok


def render(tok, request: GenerationRequest) -> str:
    """The prompt text exactly as the model sees it."""
    if request.prompt is not None:
        return request.prompt
    msgs = [m.model_dump() for m in request.messages]
    if request.continue_final:
        return tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def encode(tok, request: GenerationRequest) -> list[int]:
    if request.prompt_ids is not None:
        return list(request.prompt_ids)
    text = render(tok, request)
    # A template that writes BOS itself must not get a second one from the tokenizer.
    add_special = not (tok.bos_token and text.startswith(tok.bos_token))
    return tok(text, add_special_tokens=add_special)["input_ids"]
