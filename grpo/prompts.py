"""Turn a row's prompt (chat messages or plain text) into token ids."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Sequence

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
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        raise UserError(f"a prompt must be text or a non-empty list of {{role, content}} messages, got "
                        f"{str(prompt)[:80]!r}")
    messages = [{**m, "content": _text(m)} for m in prompt]
    if messages[-1]["role"] == "assistant":
        raise UserError("the prompt ends with an assistant message (the answer?): a prompt ends where the "
                        "model's turn begins; map the column that holds the question alone")
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}] + messages
    if not getattr(tokenizer, "chat_template", None):
        _warn_once("the tokenizer has no chat template: chat prompts are given to the model as their messages' "
                   "text, one per line (roles dropped); use a chat model, or text prompts")
        text = "\n".join(m["content"] for m in messages) + "\n"
        return tokenizer(text, add_special_tokens=True).input_ids
    extra = {"tools": tools} if tools else {}
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
    except TemplateError as exc:  # e.g. a template that refuses a system message (model.system_prompt)
        raise UserError(f"the tokenizer's chat template refused the prompt: {exc}") from None
    return tokenizer(text, add_special_tokens=False).input_ids


def cached_encoder(tokenizer, system_prompt: str | None, engine) -> Callable[[Any], list[int]]:
    """``encode_prompt`` for a run (training or eval), each distinct prompt encoded once; the engine's
    tool definitions (``prompt_tools``, chat-format tool episodes) go into the prompt."""
    cache: dict[str, list[int]] = {}

    def encode(prompt: Any) -> list[int]:
        key = json.dumps(prompt, sort_keys=True)
        if key not in cache:
            cache[key] = encode_prompt(tokenizer, prompt, system_prompt, getattr(engine, "prompt_tools", None))
        return cache[key]

    return encode


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def _text(message: dict[str, Any]) -> str:
    """A message's content as text: a string, or OpenAI-style text parts joined; None only beside tool calls."""
    content = message["content"]
    if isinstance(content, str):
        return content
    if content is None and message.get("tool_calls"):
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise UserError(f"a {message['role']} message's content must be text (or a list of "
                    f"{{type: text, text}} parts), got {str(content)[:60]!r}")


def context_of(model, engine) -> tuple[int | None, str]:
    """The positions a prompt + completion may take, and what sets them: the model's
    ``max_position_embeddings``, or the engine's own limit where smaller (vLLM's max_model_len)."""
    model_limit = getattr(model.config, "max_position_embeddings", None)
    engine_limit = getattr(engine, "context_limit", None)
    if isinstance(engine_limit, int) and (not isinstance(model_limit, int) or engine_limit < model_limit):
        return engine_limit, "vLLM's max_model_len (rollout.vllm.max_model_len)"
    return model_limit, "the model's context"


def check_prompts(splits: dict[str, Sequence[dict[str, Any]]], encode: Callable[[Any], list[int]], task: str,
                  context: int | None, completion_tokens: int, context_name: str = "the model's context") -> int:
    """Encode every row's prompt (``encode``, which may cache), so a bad one is a one-line error naming
    its split, row and id before any training rather than a crash when it is first drawn; check the
    longest plus ``completion_tokens`` fits the model's ``context`` (positions). The longest's length."""
    longest, where = 0, ""
    for split, rows in splits.items():
        for i, row in enumerate(rows):
            try:
                n = len(encode(row["prompt"]))
            except UserError as exc:
                raise UserError(f"task {task}: {split} row {i} (id {row.get('id')!r}): {exc}") from None
            if n > longest:
                longest, where = n, f"{split} row {i} (id {row.get('id')!r})"
    if isinstance(context, int) and longest + completion_tokens > context:
        raise UserError(f"task {task}: {where} has a {longest}-token prompt; with {completion_tokens} completion "
                        f"tokens that is past {context_name} of {context} positions: shorten or drop the "
                        "longest prompts, or lower rollout.max_new_tokens (tools.max_episode_tokens for episodes)")
    return longest
