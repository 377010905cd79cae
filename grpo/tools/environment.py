"""The environment protocol and the built-in ``tools`` environment.

An environment answers model turns. After each model turn that ended on one of its
``stop`` strings, the episode loop (``grpo.tools.episodes``) calls ``respond`` with the
turn's text and the episode's own state dict; the environment returns the observation
text to append (its tokens are in the context but get no gradient), or ``None`` to end
the episode. Write one as a class with these members and register it::

    from grpo.registry import ENVIRONMENTS

    @ENVIRONMENTS.register("echo")
    class Echo:
        \"\"\"Repeats the model's <echo>...</echo> back once.\"\"\"
        def __init__(self, tools, **options): self.stop = ("</echo>",)
        def respond(self, turns, states): ...   # -> list[Turn], one per turn
        def close(self): pass
        def is_call(self, turn): ...             # optional: would respond() answer this turn?

``is_call`` lets the loop cut a call in the last allowed turn without running it (its result
could not be read); without it, ``respond`` runs and its calls are counted.

and select it with ``tools.environment: echo``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from grpo.errors import UserError
from grpo.registry import ENVIRONMENTS
from grpo.tools.runner import Tool, ToolCall, ToolRunner


@dataclass
class Turn:
    """The environment's answer to one model turn."""

    observation: str | None  # appended after the model's turn; None ends the episode
    calls: list[dict[str, Any]] = field(default_factory=list)  # {tool, arguments, result, error} for the log
    errors: int = 0  # failed tool calls in this turn (the tool-error penalty counts them)


class Environment(Protocol):
    stop: tuple[str, ...]  # strings that end a model turn and hand it to the environment

    def respond(self, turns: Sequence[str], states: Sequence[dict[str, Any]]) -> list[Turn]: ...

    def close(self) -> None: ...


@ENVIRONMENTS.register("tools")
class ToolEnvironment:
    """Runs the tool call that ends a model turn; the result is the observation.

    Call formats (``call_format``):

    * ``tagged``: ``<TAG>ARG</TAG>`` where TAG is a tool's ``tag`` (``<calc>23*47</calc>``,
      ``<python>print(1)</python>``); ARG fills the tool's one string parameter, or is a
      JSON object of arguments. Small models follow this from one example.
    * ``json``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the format of
      Hermes / Qwen chat templates.
    * ``chat``: the tokenizer's own chat template: the tools' schemas are rendered into
      the prompt by the template (``prompt_tools``), calls are ``<tool_call>`` JSON, and
      the observation is the template's own rendering of a ``tool`` message (end of the
      assistant turn, the tool turn, the next assistant header), found by rendering a
      conversation around marker strings (``chat_observation_template``).

    The observation is ``observation_template`` with ``{result}`` replaced.
    """

    def __init__(self, tools: Sequence[Tool], *, call_format: str = "tagged",
                 observation_template: str = "<output>{result}</output>", timeout_s: float = 5.0,
                 max_observation_chars: int = 400, workers: int = 2, tokenizer: Any = None):
        if call_format not in ("tagged", "json", "chat"):
            raise UserError(f"tools.call_format must be 'tagged', 'json' or 'chat', got {call_format!r}")
        self.prompt_tools: list[dict[str, Any]] | None = None
        if call_format == "chat":
            observation_template = chat_observation_template(tokenizer)
            self.prompt_tools = [t.schema for t in tools]
        if "{result}" not in observation_template:
            raise UserError("tools.observation_template must contain {result}")
        self.format, self.template = call_format, observation_template
        self.tools = {t.name: t for t in tools}
        self.by_tag = {t.tag: t for t in tools}
        self.runner = ToolRunner(tools, timeout_s=timeout_s, max_observation_chars=max_observation_chars,
                                 workers=workers)
        self.stop = tuple(f"</{tag}>" for tag in self.by_tag) if call_format == "tagged" else ("</tool_call>",)

    def is_call(self, turn: str) -> bool:
        return self.parse_call(turn) is not None

    def respond(self, turns: Sequence[str], states: Sequence[dict[str, Any]]) -> list[Turn]:
        calls = [self.parse_call(t) for t in turns]
        results = self.runner.run([c for c in calls if c is not None])
        out, it = [], iter(results)
        for call in calls:
            if call is None:  # the turn did not end on a call: the episode is over
                out.append(Turn(None))
                continue
            res = next(it)
            record = {"tool": call.name, "arguments": call.arguments, "result": res.text, "error": res.error}
            out.append(Turn(self.template.replace("{result}", res.text), [record], int(res.error)))
        return out

    def parse_call(self, turn: str) -> ToolCall | None:
        """The call that ends ``turn`` (None when it ends on no stop string)."""
        # The turn ends with the token that completed the stop string; that token may carry
        # a few characters past it, so look for the string near the end, not exactly at it.
        hits = [(turn.rfind(s), s) for s in self.stop if turn.rfind(s) >= max(0, len(turn) - len(s) - 16)]
        if not hits:
            return None
        at, stop = max(hits)
        body = turn[:at]
        if self.format == "tagged":
            tag = stop[2:-1]
            start = body.rfind(f"<{tag}>")
            if start < 0:
                return ToolCall(self.by_tag[tag].name, "", error=f"found </{tag}> without an opening <{tag}>")
            return ToolCall(self.by_tag[tag].name, body[start + len(tag) + 2:].strip())
        start = body.rfind("<tool_call>")
        if start < 0:
            return ToolCall("?", "", error="found </tool_call> without an opening <tool_call>")
        try:
            call = json.loads(body[start + len("<tool_call>"):])
        except ValueError as exc:
            return ToolCall("?", "", error=f"the tool call is not valid JSON ({exc})")
        except RecursionError:  # brackets nested about a thousand deep
            return ToolCall("?", "", error="the tool call's JSON is nested too deep")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return ToolCall("?", "", error='a tool call is {"name": ..., "arguments": {...}}')
        return ToolCall(call["name"], call.get("arguments", {}))

    def close(self) -> None:
        self.runner.close()


_CALL_MARK, _RESULT_MARK = "GRPO-CALL-7f3a", "GRPO-RESULT-7f3a"


def chat_observation_template(tokenizer: Any) -> str:
    """The text a chat template puts between an assistant's tool call and its next turn, with
    ``{result}`` where the tool's output goes (e.g. Qwen: ``<|im_end|>\\n<|im_start|>user\\n
    <tool_response>\\n{result}\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n``)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or "tool" not in template:
        raise UserError("tools.call_format chat: the tokenizer's chat template has no tool support; "
                        "use call_format tagged or json")
    call = f'<tool_call>{{"name": "f", "arguments": {{"x": "{_CALL_MARK}"}}}}</tool_call>'
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": call},
                {"role": "tool", "content": _RESULT_MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # the template refuses a tool message
        raise UserError(f"tools.call_format chat: the chat template cannot render a tool message ({exc})") from exc
    end = text.find("</tool_call>", text.find(_CALL_MARK))
    if end < 0 or _RESULT_MARK not in text[end:]:
        raise UserError("tools.call_format chat: the chat template does not render the assistant's tool call and "
                        "the tool message in order; use call_format json with an observation_template")
    return text[end + len("</tool_call>"):].replace(_RESULT_MARK, "{result}")


_TAG = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def check_tags(tools: Sequence[Tool]) -> None:
    seen: dict[str, str] = {}
    for t in tools:
        if not _TAG.match(t.tag):
            raise UserError(f"tool {t.name!r}: tag {t.tag!r} must be letters, digits, _ or -")
        if t.tag in seen:
            raise UserError(f"tools {seen[t.tag]!r} and {t.name!r} share the tag {t.tag!r}")
        seen[t.tag] = t.name
