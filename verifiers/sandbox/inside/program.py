"""The program's side (untrusted process): run the model's code, then answer the
harness's requests on fd 3 (tests), or run it as ``__main__`` on stdin (io cases).
Everything here runs after the program's own code may have changed any of it; it
holds nothing the harness relies on.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from .proxy import _namedtuple, encode, rebuild_mapping
from .wire import recv, send


def _fresh_stdio() -> None:
    import io

    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8")
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding="utf-8",
                                  line_buffering=True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    sys.argv = ["program"]
    sys.path[:] = [p for p in sys.path if p.startswith(sys.base_prefix) or p.startswith(sys.prefix)]


def run_io(program: str) -> None:
    """Run the program as ``__main__`` with the case on stdin; exit status 0 on success."""
    import builtins
    import traceback
    import types

    _fresh_stdio()
    code = 0
    try:
        # as its own module: no __future__ flags of this file, and a dataclass finds its module
        module = types.ModuleType("__main__")
        module.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = module
        exec(compile(program, "<program>", "exec", dont_inherit=True), module.__dict__)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        code = code or 1
    os._exit(code & 0xFF)


def serve(program: str) -> None:
    """Run the program's top level, then answer the harness's requests on fd 3."""
    import builtins
    import operator

    _fresh_stdio()
    fd = 3
    handles: list[Any] = []

    def reply_error(exc: BaseException) -> None:
        t = type(exc)
        try:
            text = str(exc)[:500]
        except BaseException:
            text = ""
        name = t.__name__ if getattr(builtins, t.__name__, None) is t else f"{t.__module__}.{t.__name__}"
        send(fd, {"ok": False, "e": name, "msg": text})

    import types

    # its own module: no __future__ flags of this file (annotations stay objects), and a
    # dataclass finds its module in sys.modules (it failed to load)
    module = types.ModuleType("solution")
    module.__dict__["__builtins__"] = builtins
    sys.modules["solution"] = module
    ns: dict[str, Any] = module.__dict__
    try:
        exec(compile(program, "<program>", "exec", dont_inherit=True), ns)
    except BaseException as exc:
        reply_error(exc)
        os._exit(0)
    names = {}
    for k, v in list(ns.items()):
        if k.startswith("__"):
            continue
        if isinstance(v, types.ModuleType):
            names[k] = {"m": v.__name__}
        else:
            try:
                enc = encode(v, handles, None)
                if len(json.dumps(enc)) > 100_000:  # big tables stay in the program, as a handle
                    handles.append(v)
                    enc = {"h": [len(handles) - 1, type(v).__name__]}
                names[k] = enc
            except Exception:
                continue
    send(fd, {"ok": True, "names": names})
    ops = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
           "gt": operator.gt, "ge": operator.ge}
    dec = _ProgramDecoder(handles)
    while True:
        try:
            req = recv(fd)
        except BaseException:
            os._exit(0)
        try:
            op, obj = req["op"], handles[req["h"]]
            muts = []
            if op == "call":
                args = [dec(a) for a in req["a"]]
                kwargs = {k: dec(v) for k, v in req["k"].items()}
                before = {i: json.dumps(req["a"][i]) for i, a in enumerate(args)
                          if type(a) in (list, dict, set, bytearray)}
                before.update({k: json.dumps(req["k"][k]) for k, a in kwargs.items()
                               if type(a) in (list, dict, set, bytearray)})
                value = obj(*args, **kwargs)
                for key in before:
                    now = encode(args[key] if isinstance(key, int) else kwargs[key], handles, None)
                    if json.dumps(now) != before[key]:
                        muts.append([key, now])
            elif op == "getattr":
                value = getattr(obj, req["name"])
            elif op == "setattr":
                setattr(obj, req["name"], dec(req["v"]))
                value = None
            elif op == "getitem":
                value = obj[dec(req["v"])]
            elif op == "setitem":
                obj[dec(req["v"])] = dec(req["w"])
                value = None
            elif op == "delitem":
                del obj[dec(req["v"])]
                value = None
            elif op == "len":
                value = len(obj)
            elif op == "iter":
                value = iter(obj)
                handles.append(value)
                send(fd, {"ok": True, "v": {"h": [len(handles) - 1, type(value).__name__]}})
                continue
            elif op == "next":
                value = next(obj)
            elif op == "repr":
                value = repr(obj)
            elif op == "str":
                value = str(obj)
            elif op == "cmp":
                value = ops[req["name"]](obj, dec(req["v"]))
            else:
                raise ValueError(f"unknown op {op!r}")
            send(fd, {"ok": True, "v": encode(value, handles, None), "m": muts})
        except BaseException as exc:
            reply_error(exc)


class _ProgramDecoder:
    """Decode the harness's tags inside the program process (handles -> its objects)."""

    def __init__(self, handles: list[Any]):
        self.handles = handles

    def __call__(self, x: Any) -> Any:
        t = type(x)
        if t is not dict:
            return x
        (tag, v), = x.items()
        if tag == "h":
            return self.handles[v[0]]
        if tag in ("l", "t", "s", "f"):
            return {"l": list, "t": tuple, "s": set, "f": frozenset}[tag](self(i) for i in v)
        if tag == "d":
            return {self(k): self(i) for k, i in v}
        if tag in ("b", "y"):
            return (bytes if tag == "b" else bytearray).fromhex(v)
        if tag == "c":
            return complex(*v)
        if tag == "i":
            return -int(v[1:], 16) if v.startswith("-") else int(v, 16)
        if tag == "q":
            from fractions import Fraction

            return Fraction(self(v[0]), self(v[1]))
        if tag == "D":
            from decimal import Decimal

            return Decimal(v)
        if tag in ("C", "O"):  # Counter, OrderedDict, from their (key, value) pairs
            return rebuild_mapping(tag, {self(k): self(i) for k, i in v})
        if tag == "dd":
            return rebuild_mapping(tag, {self(k): self(i) for k, i in v[1]}, v[0])
        if tag == "N":  # a namedtuple the tests built: one of the same name and fields here
            return _namedtuple(v[0], tuple(v[1]))(*(self(i) for i in v[2]))
        raise ValueError(f"bad tag {tag!r}")
