"""Execute tool calls: every failure (bad call, exception, hang, crash, flood) becomes an
error observation for that call, never an exception in the training run.

Tools declare ``isolation``:

* ``"process"`` (the default, for plugin tools): the call runs in a forked worker
  process (pebble) with a wall-clock limit that kills the worker and an address-space
  cap; the worker truncates the output before sending it back.
* ``"inline"``: the tool bounds itself (the calculator's size guards, the python tool's
  sandbox) and runs in a thread of the trainer's process.
"""

from __future__ import annotations

import inspect
import json
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from grpo.errors import UserError
from grpo.isolation import WorkerError, WorkerPool, worker_call
from grpo.tools.schema import check_arguments, string_parameter, tool_schema


@dataclass
class ToolCall:
    name: str  # the tool's registered name (or the tag the model wrote, if unknown)
    arguments: Any  # dict of arguments, or the raw text of a tagged call
    error: str = ""  # the call could not be parsed: the observation is this error


@dataclass
class ToolResult:
    text: str  # the observation the model sees (already truncated)
    error: bool
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Tool:
    name: str
    fn: Callable[..., Any]
    schema: dict[str, Any]
    tag: str  # tagged format: <tag>...</tag>
    isolation: str
    close: Callable[[], None] | None = None


def load_tool(name: str, options: dict[str, Any]) -> Tool:
    """A registered tool (function or class) ready to call; classes get the ``options`` they accept."""
    from grpo.registry import TOOLS

    obj = TOOLS.get(name)
    display = name.rpartition(":")[2] if ":" in name else name
    if inspect.isclass(obj):
        accepted = inspect.signature(obj).parameters
        kwargs = {k: v for k, v in options.items() if k in accepted}
        try:
            instance = obj(**kwargs)
        except TypeError as exc:
            raise UserError(f"tool {name!r}: cannot construct it: {exc}") from exc
        fn: Callable[..., Any] = instance.__call__
        close = getattr(instance, "close", None)
    elif callable(obj):
        instance, fn, close = obj, obj, None
    else:
        raise UserError(f"tool {name!r} is not a function or a class with __call__ (got {type(obj).__name__})")
    isolation = getattr(instance, "isolation", "process")
    if isolation not in ("process", "inline"):
        raise UserError(f"tool {name!r}: isolation must be 'process' or 'inline', got {isolation!r}")
    return Tool(display, fn, tool_schema(fn, display), getattr(instance, "tag", display), isolation, close)


class ToolRunner:
    """Runs a batch of calls concurrently with per-call time limits and truncated output."""

    def __init__(self, tools: Sequence[Tool], *, timeout_s: float = 5.0, max_observation_chars: int = 400,
                 workers: int = 2, memory_mb: int = 2048):
        self.tools = {t.name: t for t in tools}
        self.timeout_s, self.max_chars = timeout_s, max_observation_chars
        self.workers, self.memory_mb = max(1, workers), memory_mb
        self._threads: ThreadPoolExecutor | None = None
        self._pool = WorkerPool(self.workers)  # run_one runs on several threads: one pool, rebuilt when broken

    def run(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        if not calls:
            return []
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="grpo-tool")
        return list(self._threads.map(self.run_one, calls))

    def run_one(self, call: ToolCall) -> ToolResult:
        if call.error:
            return self._error(call.error)
        tool = self.tools.get(call.name)
        if tool is None:
            return self._error(f"unknown tool {call.name!r}; available: {', '.join(self.tools)}")
        try:
            arguments = call.arguments
            if isinstance(arguments, str):
                param = string_parameter(tool.schema)
                if param is not None:
                    arguments = {param: arguments}
                else:
                    arguments = json.loads(arguments)
            arguments = check_arguments(tool.schema, arguments)
        except (ValueError, TypeError) as exc:
            return self._error(f"bad call to {tool.name}: {exc}")
        except RecursionError:  # brackets nested about a thousand deep
            return self._error(f"bad call to {tool.name}: its JSON is nested too deep")
        try:
            if tool.isolation == "inline":
                try:
                    text = _truncate(_as_text(tool.fn(**arguments)), self.max_chars)
                except (SystemExit, KeyboardInterrupt) as exc:  # sys.exit in a tool ends its call only
                    raise WorkerError(f"{type(exc).__name__}: {exc}") from None
            else:
                text = self._in_worker(tool, arguments)
        except TimeoutError:
            return self._error(f"{tool.name} timed out after {self.timeout_s:g} s")
        except MemoryError:
            return self._error(f"{tool.name} ran out of memory ({self.memory_mb} MB)")
        except WorkerError as exc:  # the tool raised (any exception, as text)
            return self._error(str(exc))
        except Exception as exc:  # an inline tool raised, or a worker process died
            return self._error(f"{type(exc).__name__}: {exc}")
        return ToolResult(text, False)

    def _error(self, message: str) -> ToolResult:
        return ToolResult(_truncate("error: " + message, self.max_chars), True)

    def _in_worker(self, tool, arguments) -> str:
        args = (tool.fn, arguments, self.max_chars, self.memory_mb)
        # a backstop beyond pebble's own timeout: a worker killed as the call was handed over
        # left the future unresolved forever (a pebble race)
        wait = self.timeout_s + 60 if self.timeout_s else None
        try:
            return self._pool.schedule(_call_in_worker, args, self.timeout_s).result(timeout=wait)
        except BrokenProcessPool:  # a worker killed from outside: a new pool, this call once more
            self._pool.discard()
            return self._pool.schedule(_call_in_worker, args, self.timeout_s).result(timeout=wait)

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None
        self._pool.close()
        for tool in self.tools.values():
            if tool.close is not None:
                tool.close()


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters]"


def _call_in_worker(fn: Callable[..., Any], arguments: dict[str, Any], max_chars: int, memory_mb: int) -> str:
    """Runs inside a pool worker: call and truncate under ``worker_call`` (``memory_mb`` beyond what the
    worker, a fork of the trainer, maps already; any raise returns as a ``WorkerError``)."""
    with worker_call(memory_mb):
        return _truncate(_as_text(fn(**arguments)), max_chars)
