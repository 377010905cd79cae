"""Turn a row's prompt (chat messages or plain text) into token ids."""

from __future__ import annotations

from typing import Any

from grpo.errors import UserError


def encode_prompt(tokenizer, prompt: Any, system_prompt: str | None = None,
                  tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Chat messages go through the tokenizer's chat template (with the generation
    prompt); a plain string is used as raw text (completion-style prompting).

    ``tools``: tool definitions (JSON schemas) the chat template renders into the prompt,
    for ``tools.call_format: chat`` episodes (``grpo.tools``)."""
    if isinstance(prompt, str):
        if not prompt:
            raise UserError("empty prompt")
        return tokenizer(prompt, add_special_tokens=True).input_ids
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        raise UserError(f"a prompt must be text or a list of {{role, content}} messages, got {str(prompt)[:80]!r}")
    messages = list(prompt)
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}] + messages
    if not getattr(tokenizer, "chat_template", None):
        text = "\n".join(m["content"] for m in messages) + "\n"
        return tokenizer(text, add_special_tokens=True).input_ids
    extra = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
    return tokenizer(text, add_special_tokens=False).input_ids
