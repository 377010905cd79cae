"""A tool is a typed Python function with a Google-style docstring; its schema comes from both.

``tool_schema(fn)`` returns the OpenAI / transformers tool definition::

    {"type": "function", "function": {"name": ..., "description": ...,
     "parameters": {"type": "object", "properties": {...}, "required": [...]}}}

It is ``transformers.utils.get_json_schema``: chat templates with tool support
(``apply_chat_template(..., tools=[...])``) consume exactly that shape, it already maps
``int | None``, ``list[str]``, ``Literal`` and per-argument docstring lines, and it
raises on a missing type hint or argument description, which we turn into a
``UserError`` naming the tool. Writing our own would duplicate it and drift from what
the templates expect.
"""

from __future__ import annotations

from typing import Any, Callable

from grpo.errors import UserError

_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
               "array": list, "object": dict}


def tool_schema(fn: Callable[..., Any], name: str | None = None) -> dict[str, Any]:
    """The tool definition of ``fn`` (named ``name`` when registered under another name)."""
    from transformers.utils import get_json_schema

    try:
        schema = get_json_schema(fn)
    except Exception as exc:  # transformers' TypeHintParsingException / DocstringParsingException
        where = getattr(fn, "__qualname__", repr(fn))
        raise UserError(f"tool {name or where}: cannot derive its JSON schema: {exc} (a tool needs a type hint "
                        "and an 'Args:' docstring line for every parameter)") from exc
    schema["function"].pop("return", None)
    if name:
        schema["function"]["name"] = name
    return schema


def string_parameter(schema: dict[str, Any]) -> str | None:
    """The parameter a tagged call ``<tag>TEXT</tag>`` fills: the only required string one, if any."""
    params = schema["function"]["parameters"]
    required = params.get("required", [])
    if len(required) == 1 and params["properties"][required[0]].get("type") == "string":
        return required[0]
    return None


def check_arguments(schema: dict[str, Any], arguments: Any) -> dict[str, Any]:
    """``arguments`` checked against the schema: a dict, no unknown or missing keys, JSON types.

    Raises ``ValueError`` with a short message the model sees as its error observation.
    """
    if not isinstance(arguments, dict):
        raise ValueError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    params = schema["function"]["parameters"]
    props, required = params.get("properties", {}), params.get("required", [])
    unknown = sorted(set(arguments) - set(props))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; expected {', '.join(props) or 'none'}")
    missing = [k for k in required if k not in arguments]
    if missing:
        raise ValueError(f"missing argument(s) {', '.join(missing)}")
    for key, value in arguments.items():
        want = _JSON_TYPES.get(props[key].get("type", ""))
        if want is not None and (not isinstance(value, want) or (isinstance(value, bool) and want is not bool)):
            raise ValueError(f"argument {key} must be of type {props[key]['type']}, got {type(value).__name__}")
    return arguments
