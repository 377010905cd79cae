"""One registry mechanism for tasks and verifiers.

Built-ins and third-party plugins go through the same ``Registry.register`` call:

* the ``@register`` decorator, fired when a module is imported (built-in modules,
  a ``--plugins FILE.py`` file, or a module an entry point names);
* Python entry points in the groups ``grpo.tasks`` and ``grpo.verifiers``
  (``name = "package.module:object"`` in the plugin's pyproject);
* a ``module:attr`` (or ``path/to/file.py:attr``) path used directly as a name.

A config is data, not code. It imports code only through ``plugins:`` (files or module
names, ``load_plugin``), and a path target resolves only inside those plugins, entry-point
modules and this project's ``tasks`` / ``verifiers`` packages; anything else is an error
naming the module to add to ``plugins:``. The object found is checked before anything
calls it: a task target must be a ``tasks.base.Task`` subclass or instance, a verifier
target a ``verifiers.base.Verifier`` subclass or instance or a plain function (a TRL/verl
reward function); any other object (a factory) must be registered with a decorator.
So ``task.name: "subprocess:run"`` is refused before ``subprocess.run`` could be called.

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

    def __init__(self, kind: str, group: str, builtin_modules: tuple[str, ...] = (), *,
                 base: str | None = None, functions: bool = False):
        self.kind = kind
        self.group = group
        self.builtin_modules = builtin_modules
        self.base = base  # "module:Class" a path target must subclass or instantiate (imported when needed)
        self.functions = functions  # path targets may also be plain functions
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
        self.load()
        if ":" in name:
            return self._checked_target(name, _import_path(name, self.kind))
        if name in self._entries:
            return self._entries[name].obj
        if name in self._failed:
            raise UserError(f"{self.kind} {name!r} failed to load: {self._failed[name]}")
        known = sorted(self._entries)
        raise UserError(f"unknown {self.kind} {name!r}.{closest(name, known)} "
                        f"Known: {', '.join(known) or '(none)'}. See `grpo list`.")

    def _checked_target(self, path: str, obj: Any) -> Any:
        """``obj`` if a path target may name it (see the module docstring), else a UserError."""
        if any(e.obj is obj for e in self._entries.values()):
            return obj
        if self.base is not None:
            module, _, attr = self.base.partition(":")
            base = getattr(importlib.import_module(module), attr)
            if isinstance(obj, base) or (inspect.isclass(obj) and issubclass(obj, base)):
                return obj
        if self.functions and callable(obj) and not inspect.isclass(obj):
            return obj
        wanted = f"a {self.base.partition(':')[2]} subclass or instance" if self.base else "a registered object"
        if self.functions:
            wanted += " or a function"
        raise UserError(f"{self.kind} {path!r} is {_describe(obj)}, not {wanted}; register a factory with "
                        f"@{self.kind.upper()}S.register(...) in a plugin to name it")

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
                    _EXPLICIT_MODULES.add(ep.module)
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


# Modules a path target may resolve in besides this project's own: plugins (files and module
# names given to ``load_plugin``) and entry-point modules. Nothing else is imported for a name.
_EXPLICIT_MODULES: set[str] = set()
_OWN_PACKAGES = ("tasks", "verifiers", "grpo.tools")


def _own_module(module_name: str) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in _OWN_PACKAGES)


def _describe(obj: Any) -> str:
    if inspect.isclass(obj):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if callable(obj):
        return f"the callable {getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    return f"a {type(obj).__name__}"


def _import_path(path: str, kind: str) -> Any:
    """``package.module:attr``, or ``path/to/file.py:attr``, from a plugin or this project (never a new import
    of anything else: importing code is what ``plugins:`` is for)."""
    module_name, _, attr = path.rpartition(":")
    if module_name.endswith(".py"):
        module = _import_file(module_name, kind)
        module_name = module.__name__
    else:
        if not _own_module(module_name) and module_name not in _EXPLICIT_MODULES:
            raise UserError(f"{kind} {path!r}: module {module_name!r} is not a plugin; a config imports code only "
                            f"through plugins: add it there (plugins: [{module_name}]) or --plugins {module_name}")
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
    """The module of a ``file.py:attr`` target: a file loaded as a plugin."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(f"{kind} {file}: file not found")
    name = _plugin_module_name(path)
    if name not in _EXPLICIT_MODULES or name not in sys.modules:
        raise UserError(f"{kind} {file}: the file is not a plugin; a config imports code only through plugins: "
                        f"add it there (plugins: [{file}]) or --plugins {file}")
    return sys.modules[name]


def target_plugins(name: str) -> list[str]:
    """The plugin a ``module:attr`` / ``file.py:attr`` name given on the command line implies
    (a flag naming code is an explicit request to import it); [] for a plain name."""
    if ":" not in name:
        return []
    module = name.rpartition(":")[0]
    return [] if _own_module(module) else [module]


def load_plugin(spec: str, *registries: Registry) -> None:
    """A ``plugins:`` entry: a Python file (``path/to/x.py``) or an importable module name."""
    if spec.endswith(".py") or "/" in spec:
        load_plugin_file(spec, f"plugin file {spec}", *registries)
        return
    if not all(part.isidentifier() for part in spec.split(".")):
        raise UserError(f"plugin {spec!r}: expected a .py file or a module name such as mypkg.rewards")
    for registry in registries:
        registry.load()
        registry._current_source = f"plugin module {spec}"
    try:
        importlib.import_module(spec)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"plugin module {spec} failed to import: {type(exc).__name__}: {exc}") from exc
    finally:
        for registry in registries:
            registry._current_source = None
    _EXPLICIT_MODULES.add(spec)


def load_plugin_file(path: str | Path, source: str, *registries: Registry) -> None:
    """Import a Python file as a module; its ``@register`` decorators run.

    The module's registrations are credited to ``source``. An import error is a
    ``UserError`` naming the file (an explicitly requested plugin must work).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plugin file not found: {path}")
    module_name = _plugin_module_name(path)
    _EXPLICIT_MODULES.add(module_name)
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


TASKS: Registry[Any] = Registry("task", "grpo.tasks", builtin_modules=("tasks.builtin",), base="tasks.base:Task")
VERIFIERS: Registry[Any] = Registry("verifier", "grpo.verifiers",
                                    builtin_modules=("verifiers.builtin", "grpo.rm.verifier"),
                                    base="verifiers.base:Verifier", functions=True)
TOOLS: Registry[Any] = Registry("tool", "grpo.tools", builtin_modules=("grpo.tools.builtin",), functions=True)
ENVIRONMENTS: Registry[Any] = Registry("environment", "grpo.environments",
                                       builtin_modules=("grpo.tools.environment",))
