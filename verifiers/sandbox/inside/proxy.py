"""The harness end of the RPC to the program: a strict decoder of plain data, and
``Proxy`` objects standing for the program's objects (they equal only themselves,
refuse ``bool()`` and arithmetic). ``encode`` is shared with the program's side.
"""

from __future__ import annotations

import collections
from typing import Any

from .wire import ProgramGone, ProtocolError, recv, send


_EXC_OK = {"ArithmeticError", "AssertionError", "AttributeError", "BufferError", "EOFError",
           "FloatingPointError", "IndexError", "KeyError", "LookupError", "MemoryError", "NameError",
           "NotImplementedError", "OSError", "OverflowError", "RecursionError", "RuntimeError",
           "StopIteration", "TypeError", "UnboundLocalError", "UnicodeError", "ValueError",
           "ZeroDivisionError", "FileNotFoundError", "PermissionError", "TimeoutError", "Exception"}


class ProgramError(Exception):
    """An exception of a non-builtin type raised by the program."""


class Remote:
    """The harness end of the RPC socket. Decodes only plain data and handles."""

    def __init__(self, fd: int, deadline: float):
        self.fd, self.deadline = fd, deadline
        self.broken = ""

    def recv(self) -> Any:
        try:
            msg = recv(self.fd, self.deadline)
        except (EOFError, OSError):
            self.broken = self.broken or "program process exited"
            raise ProgramGone() from None
        except ProtocolError as exc:
            self.broken = self.broken or str(exc)
            raise
        if not isinstance(msg, dict):
            self.broken = "bad message"
            raise ProtocolError("bad message")
        return msg

    def request(self, op: str, h: int, args: tuple = (), kwargs: dict | None = None, **kw) -> Any:
        if self.broken:
            raise ProgramGone()
        try:
            send(self.fd, {"op": op, "h": h, **kw})
        except OSError:
            self.broken = "program process exited"
            raise ProgramGone() from None
        msg = self.recv()
        if msg.get("ok") is True:
            try:
                value = self.decode(msg.get("v"))
                changes = msg.get("m", []) if op == "call" else []
                if type(changes) is not list or any(type(c) is not list or len(c) != 2 for c in changes):
                    raise ProtocolError("bad argument changes")
                for key, enc in changes:  # in-place changes to list/dict/set arguments
                    self._mutated(args, kwargs or {}, key, enc)
            except ProtocolError as exc:  # fails the run even if the tests catch everything
                self.broken = self.broken or str(exc)
                raise
            return value
        name, text = str(msg.get("e", "Error")), str(msg.get("msg", ""))[:500]
        if name in _EXC_OK and (name != "StopIteration" or op == "next"):
            import builtins

            raise getattr(builtins, name)(text)
        if name in ("SystemExit", "KeyboardInterrupt", "GeneratorExit"):
            self.broken = f"program raised {name}"
            raise ProgramGone()
        # (StopIteration from a call would silently end the test's map()/generator loops)
        raise ProgramError(f"{name}: {text}")

    def _mutated(self, args: tuple, kwargs: dict, key: Any, enc: Any) -> None:
        orig = args[key] if type(key) is int and 0 <= key < len(args) else \
            kwargs.get(key) if type(key) is str else None
        new = self.decode(enc)
        if type(orig) is list and type(new) is list or type(orig) is bytearray and type(new) is bytearray:
            orig[:] = new
        elif type(orig) in (dict, set) and type(new) is type(orig):
            orig.clear()
            orig.update(new)

    def call(self, h: int, args: tuple, kwargs: dict) -> Any:
        return self.request("call", h, args, kwargs, a=[self.encode(a) for a in args],
                            k={str(k): self.encode(v) for k, v in kwargs.items()})

    # plain data <-> JSON. Tags: l list, t tuple, d dict, s set, f frozenset, b bytes,
    # y bytearray, c complex, i big int (hex), q Fraction, D Decimal, h handle.
    def encode(self, v: Any) -> Any:
        return encode(v, None, self)

    def decode(self, x: Any, depth: int = 0) -> Any:
        if depth > 100:
            raise ProtocolError("value nested too deeply")
        t = type(x)
        if t in (int, float, str, bool) or x is None:
            return x
        if t is not dict or len(x) != 1:
            raise ProtocolError("bad value")
        (tag, v), = x.items()
        d = depth + 1
        if tag in ("l", "t", "s", "f") and type(v) is list:
            items = [self.decode(i, d) for i in v]
            try:
                return {"l": list, "t": tuple, "s": set, "f": frozenset}[tag](items)
            except TypeError:
                raise ProtocolError("unhashable set item") from None
        if tag == "d" and type(v) is list:
            out = {}
            for pair in v:
                if type(pair) is not list or len(pair) != 2:
                    raise ProtocolError("bad dict item")
                try:
                    out[self.decode(pair[0], d)] = self.decode(pair[1], d)
                except TypeError:
                    raise ProtocolError("unhashable dict key") from None
            return out
        if tag in ("b", "y") and type(v) is str:
            try:
                return (bytes if tag == "b" else bytearray).fromhex(v)
            except ValueError:
                raise ProtocolError("bad bytes") from None
        if tag == "c" and type(v) is list and len(v) == 2 and all(type(p) in (int, float) for p in v):
            return complex(v[0], v[1])
        if tag == "i" and type(v) is str and 0 < len(v) <= 200_000:
            try:
                return int(v, 16)
            except ValueError:
                raise ProtocolError("bad int") from None
        if tag == "q" and type(v) is list and len(v) == 2:
            from fractions import Fraction

            n, m = (self.decode(p, d) for p in v)
            if type(n) is int and type(m) is int and m > 0:
                return Fraction(n, m)
        if tag == "D" and type(v) is str and len(v) <= 10_000:
            from decimal import Decimal, InvalidOperation

            try:
                return Decimal(v)
            except InvalidOperation:
                pass
        if tag == "h" and type(v) is list and len(v) == 2 and type(v[0]) is int and type(v[1]) is str:
            return Proxy(self, v[0], v[1][:100])
        if tag in ("C", "O", "dd") and type(v) is list:  # Counter, OrderedDict, defaultdict, rebuilt here
            factory = None
            if tag == "dd":
                if len(v) != 2 or type(v[1]) is not list or (v[0] is not None and v[0] not in _FACTORIES):
                    raise ProtocolError("bad defaultdict")
                factory, v = v[0], v[1]
            return rebuild_mapping(tag, self.decode({"d": v}, depth), factory)
        if tag == "N" and type(v) is list and len(v) == 3 and type(v[1]) is list \
                and type(v[2]) is list and len(v[1]) == len(v[2]) <= 255 \
                and type(v[0]) is str and v[0].isidentifier() \
                and all(type(f) is str and f.isidentifier() and not f.startswith("_") for f in v[1]):
            values = [self.decode(i, d) for i in v[2]]
            try:
                return _namedtuple(v[0], tuple(v[1]))(*values)
            except (TypeError, ValueError):
                raise ProtocolError("bad namedtuple") from None
        raise ProtocolError(f"bad value tag {tag!r}")


def encode(v: Any, handles: list | None, remote: Remote | None, depth: int = 0) -> Any:
    """Plain data -> JSON-able tags. Program side (``handles``): anything else becomes a
    handle. Harness side (``remote``): proxies become their handle, anything else is refused."""
    t = type(v)
    if t is bool or v is None or t is str or t is float:
        return v
    if t is int:
        return v if -(1 << 62) < v < (1 << 62) else {"i": format(v, "x") if v >= 0 else "-" + format(-v, "x")}
    if depth > 90:
        if handles is not None:
            handles.append(v)
            return {"h": [len(handles) - 1, t.__name__]}
        raise TypeError("value nested too deeply to pass to the program")
    d = depth + 1
    if t in (list, tuple, set, frozenset, dict) or _stdlib_container(t):
        if id(v) in _ON_PATH:  # a cycle (a.next.prev is a): the repeat travels as a handle
            if handles is not None:
                handles.append(v)
                return {"h": [len(handles) - 1, t.__name__]}
            raise TypeError("a cyclic value cannot be passed to the program")
        _ON_PATH.add(id(v))
        try:
            return _encode_container(v, t, handles, remote, d)
        finally:
            _ON_PATH.discard(id(v))
    if t is bytes:
        return {"b": v.hex()}
    if t is bytearray:
        return {"y": v.hex()}
    if t is complex:
        return {"c": [v.real, v.imag]}
    mod = getattr(t, "__module__", "")
    if t.__name__ == "Fraction" and mod == "fractions":
        return {"q": [encode(v.numerator, handles, remote, d), encode(v.denominator, handles, remote, d)]}
    if t.__name__ == "Decimal" and mod in ("decimal", "_decimal", "_pydecimal"):
        return {"D": str(v)}
    if handles is not None:
        handles.append(v)
        return {"h": [len(handles) - 1, t.__name__]}
    if isinstance(v, Proxy) and object.__getattribute__(v, "_remote") is remote:
        return {"h": [object.__getattribute__(v, "_h"), ""]}
    raise TypeError(f"cannot pass a {t.__name__} to the program (only plain data and its own objects)")


_ON_PATH: set[int] = set()  # containers being encoded (one encode at a time per process)
# The genuine classes, taken before any program runs (a program may rebind collections.Counter).
_COUNTER, _ORDERED, _DEFAULT = collections.Counter, collections.OrderedDict, collections.defaultdict
_ORDERED_ITEMS = collections.OrderedDict.items
_FACTORIES = {"int": int, "float": float, "str": str, "list": list, "set": set, "dict": dict, "tuple": tuple}
_NAMEDTUPLE_NAMES = frozenset(vars(collections.namedtuple("_T", "a"))) - {"a"} | {"__annotations__",
                                                                                  "__orig_bases__"}


def _stdlib_container(t: type) -> bool:
    return t in (_COUNTER, _ORDERED, _DEFAULT) or _is_namedtuple(t)


def _is_namedtuple(t: type) -> bool:
    """A plain namedtuple class (collections.namedtuple or typing.NamedTuple, nothing added):
    it travels as its fields and values; one with methods of its own stays a handle."""
    fields = t.__dict__.get("_fields") if t.__bases__ == (tuple,) else None
    return isinstance(fields, tuple) and all(type(f) is str for f in fields) \
        and set(t.__dict__) <= _NAMEDTUPLE_NAMES | set(fields)


def _encode_container(v: Any, t: type, handles: list | None, remote: Remote | None, d: int) -> Any:
    """Plain containers, and the stdlib's Counter, OrderedDict, defaultdict and plain namedtuples,
    both ways (a correct answer of those types compares as data on the tests' side, rebuilt
    there; a namedtuple the tests built goes back as one; a program's own subclasses stay
    handles with their methods). Read through the genuine classes' methods: ``t`` is exactly one
    of them, or a namedtuple class with nothing of its own."""
    if t in (list, tuple, set, frozenset):
        tag = {list: "l", tuple: "t", set: "s", frozenset: "f"}[t]
        return {tag: [encode(i, handles, remote, d) for i in v]}
    if t is dict or t in (_COUNTER, _DEFAULT):
        pairs = [[encode(k, handles, remote, d), encode(i, handles, remote, d)] for k, i in dict.items(v)]
        if t is dict:
            return {"d": pairs}
        if t is _COUNTER:
            return {"C": pairs}
        name = next((n for n, f in _FACTORIES.items() if v.default_factory is f), None)
        return {"dd": [name, pairs]}
    if t is _ORDERED:
        return {"O": [[encode(k, handles, remote, d), encode(i, handles, remote, d)] for k, i in _ORDERED_ITEMS(v)]}
    return {"N": [t.__name__, list(t.__dict__["_fields"]), [encode(i, handles, remote, d) for i in tuple.__iter__(v)]]}


def rebuild_mapping(tag: str, pairs: dict, factory: str | None = None) -> Any:
    """The Counter (``C``), OrderedDict (``O``) or defaultdict (``dd``, with a builtin ``factory``
    by name) an ``encode`` sent, from its decoded items; the same on both sides."""
    if tag == "dd":
        return _DEFAULT(_FACTORIES.get(factory), pairs)
    return (_COUNTER if tag == "C" else _ORDERED)(pairs)


_NAMEDTUPLES: dict[tuple[str, tuple[str, ...]], type] = {}


def _namedtuple(name: str, fields: tuple[str, ...]) -> type:
    key = (name, fields)
    if key not in _NAMEDTUPLES:
        _NAMEDTUPLES[key] = collections.namedtuple(name, fields)
    return _NAMEDTUPLES[key]


class Proxy:
    """An object that lives in the program's process. Calls, attributes, items, len and
    iteration are forwarded; truth value, arithmetic and comparison with anything but
    another of the program's objects are refused or false."""

    __slots__ = ("_remote", "_h", "_type")

    def __init__(self, remote: Remote, h: int, type_name: str):
        object.__setattr__(self, "_remote", remote)
        object.__setattr__(self, "_h", h)
        object.__setattr__(self, "_type", type_name)

    def _req(self, op: str, **kw) -> Any:
        return object.__getattribute__(self, "_remote").request(op, object.__getattribute__(self, "_h"), **kw)

    def _enc(self, v: Any) -> Any:
        return object.__getattribute__(self, "_remote").encode(v)

    def __call__(self, *args, **kwargs):
        return object.__getattribute__(self, "_remote").call(object.__getattribute__(self, "_h"), args, kwargs)

    def __getattr__(self, name: str):
        return self._req("getattr", name=name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._req("setattr", name=name, v=self._enc(value))

    def __getitem__(self, key):
        return self._req("getitem", v=self._enc(key))

    def __setitem__(self, key, value) -> None:
        self._req("setitem", v=self._enc(key), w=self._enc(value))

    def __delitem__(self, key) -> None:
        self._req("delitem", v=self._enc(key))

    def __len__(self) -> int:
        n = self._req("len")
        if type(n) is not int or n < 0:
            raise TypeError("len() of a program object returned a non-int")
        return n

    def __iter__(self):
        it = self._req("iter")
        if not isinstance(it, Proxy):
            raise TypeError("iter() of a program object returned plain data")
        return it

    def __next__(self):
        return self._req("next")

    def __repr__(self) -> str:
        s = self._req("repr")
        if type(s) is not str:
            raise TypeError("repr() of a program object is not a str")
        return s

    def __str__(self) -> str:
        s = self._req("str")
        if type(s) is not str:
            raise TypeError("str() of a program object is not a str")
        return s

    def __bool__(self) -> bool:
        raise TypeError(f"a {object.__getattribute__(self, '_type')} object from the program has no "
                        "trusted truth value; return a bool")

    def __hash__(self) -> int:
        return object.__hash__(self)

    def _cmp(self, op: str, other: Any):
        if not isinstance(other, Proxy) or object.__getattribute__(other, "_remote") is not \
                object.__getattribute__(self, "_remote"):
            return NotImplemented  # == with plain data falls back to identity: False
        return self._req("cmp", name=op, v=self._enc(other))

    def __eq__(self, other):
        if other is self:
            return True
        return self._cmp("eq", other)

    def __ne__(self, other):
        if other is self:
            return False
        return self._cmp("ne", other)

    def __lt__(self, other):
        return self._cmp("lt", other)

    def __le__(self, other):
        return self._cmp("le", other)

    def __gt__(self, other):
        return self._cmp("gt", other)

    def __ge__(self, other):
        return self._cmp("ge", other)
