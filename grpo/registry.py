"""One registry mechanism for tasks and verifiers.

Built-ins and third-party plugins go through the same ``Registry.register`` call:

* the ``@register`` decorator, fired when a module is imported (built-in modules,
  a ``--plugins FILE.py`` file, or a module an entry point names);
* Python entry points in the groups ``grpo.tasks`` and ``grpo.verifiers``
  (``name = "package.module:object"`` in the plugin's pyproject);
* a ``module:attr`` path used directly as a name in a config.

Duplicate names raise; unknown names raise with the closest matches; a plugin that
fails to import is recorded and reported (``grpo list``) and raises when its name
is asked for, never silently dropped.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from grpo.errors import UserError

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    name: str
    obj: T
    description: str
    source: str


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def closest(name: str, candidates: list[str], n: int = 3) -> str:
    """'Did you mean' text for an unknown name ('' when nothing is close)."""
    matches = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    return f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


class Registry(Generic[T]):
    """Name -> object registry with entry-point discovery.

    ``kind`` is used in messages ("task", "verifier"); ``group`` is the entry-point
    group; ``builtin_modules`` are imported on first use so their decorators fire.
    """

    def __init__(self, kind: str, group: str, builtin_modules: tuple[str, ...] = ()):
        self.kind = kind
        self.group = group
        self.builtin_modules = builtin_modules
        self._entries: dict[str, Entry[T]] = {}
        self._failed: dict[str, str] = {}  # name or module -> error text
        self._loaded = False
        self._loading = False
        self._current_source: str | None = None

    # ----------------------------------------------------------------- register
    def register(self, name: str | None = None, *, description: str | None = None,
                 source: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@TASKS.register("arith")`` over a class or factory."""

        def wrap(obj: T) -> T:
            self.add(name or getattr(obj, "name", None) or obj.__name__, obj,
                     description=description, source=source)
            return obj

        return wrap

    def add(self, name: str, obj: T, *, description: str | None = None,
            source: str | None = None) -> None:
        if not isinstance(name, str) or not name or ":" in name:
            raise UserError(f"invalid {self.kind} name {name!r}: use a non-empty name without ':'")
        src = source or self._current_source or _module_source(obj)
        prior = self._entries.get(name)
        if prior is not None:
            if prior.obj is obj:
                return  # the same object seen twice (module imported again, entry point of a built-in)
            raise UserError(f"duplicate {self.kind} name {name!r}: registered by {prior.source} "
                            f"and again by {src}; rename one of them")
        self._entries[name] = Entry(name, obj, description or _first_doc_line(obj), src)

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> T:
        """The object for ``name``; ``package.module:attr`` imports it directly."""
        if ":" in name:
            return _import_path(name, self.kind)
        self.load()
        if name in self._entries:
            return self._entries[name].obj
        if name in self._failed:
            raise UserError(f"{self.kind} {name!r} failed to load: {self._failed[name]}")
        known = sorted(self._entries)
        raise UserError(f"unknown {self.kind} {name!r}.{closest(name, known)} "
                        f"Known: {', '.join(known) or '(none)'}. See `grpo list`.")

    def entries(self) -> dict[str, Entry[T]]:
        self.load()
        return dict(sorted(self._entries.items()))

    def failures(self) -> dict[str, str]:
        self.load()
        return dict(self._failed)

    def names(self) -> list[str]:
        return list(self.entries())

    # --------------------------------------------------------------- discovery
    def load(self) -> None:
        """Import built-ins, then entry points (once)."""
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            for module in self.builtin_modules:
                self._current_source = "built-in"
                try:
                    importlib.import_module(module)
                finally:
                    self._current_source = None
            for ep in importlib.metadata.entry_points(group=self.group):
                dist = getattr(ep, "dist", None)
                dist_name = dist.metadata["Name"] if dist is not None else "?"
                source = f"entry point {ep.value} ({dist_name})"
                try:
                    self._current_source = source
                    obj = ep.load()
                except Exception as exc:  # a broken plugin is reported, not dropped
                    self._failed[ep.name] = f"{type(exc).__name__}: {exc} (from {source})"
                    continue
                finally:
                    self._current_source = None
                if not inspect.ismodule(obj):
                    self.add(ep.name, obj, source=source)
            self._loaded = True
        finally:
            self._loading = False

    def load_file(self, path: str | Path) -> None:
        """Import a plugin file (``--plugins FILE.py``); its decorators register."""
        load_plugin_file(path, f"plugin file {path}", self)


_BUILTIN_PACKAGES = ("grpo", "tasks", "verifiers")


def _module_source(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or "?"
    # This package's own modules are built-ins whatever imported them first.
    if module.split(".")[0] in _BUILTIN_PACKAGES:
        return "built-in"
    return f"module {module}"


def _import_path(path: str, kind: str) -> Any:
    """``package.module:attr``, or ``path/to/file.py:attr`` (the file is imported as a plugin)."""
    module_name, _, attr = path.rpartition(":")
    if module_name.endswith(".py"):
        module = _import_file(module_name, kind)
        module_name = module.__name__
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise UserError(f"cannot import {kind} {path!r}: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{kind} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _plugin_module_name(path: Path) -> str:
    return f"grpo_plugin_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"


def _import_file(file: str, kind: str) -> Any:
    """The module of a ``file.py:attr`` target (imported once, like a plugin file)."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(f"{kind} {file}: file not found")
    load_plugin_file(path, f"file {file}")
    return sys.modules[_plugin_module_name(path)]


def load_plugin_file(path: str | Path, source: str, *registries: Registry) -> None:
    """Import a Python file as a module; its ``@register`` decorators run.

    The module's registrations are credited to ``source``. An import error is a
    ``UserError`` naming the file (an explicitly requested plugin must work).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plugin file not found: {path}")
    module_name = _plugin_module_name(path)
    if module_name in sys.modules:
        return
    for registry in registries:
        registry.load()
        registry._current_source = source
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except UserError:
            raise
        except Exception as exc:
            del sys.modules[module_name]
            raise UserError(f"plugin file {path} failed to import: {type(exc).__name__}: {exc}") from exc
    finally:
        for registry in registries:
            registry._current_source = None


TASKS: Registry[Any] = Registry("task", "grpo.tasks", builtin_modules=("tasks.builtin",))
VERIFIERS: Registry[Any] = Registry("verifier", "grpo.verifiers",
                                   builtin_modules=("verifiers.builtin", "grpo.rm.verifier"))
TOOLS: Registry[Any] = Registry("tool", "grpo.tools", builtin_modules=("grpo.tools.builtin",))
ENVIRONMENTS: Registry[Any] = Registry("environment", "grpo.environments",
                                       builtin_modules=("grpo.tools.environment",))
