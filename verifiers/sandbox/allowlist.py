"""The sandbox's view of the filesystem, as an allow-list (caller side).

The program and the tests each see a fresh, read-only root holding only what a forked
interpreter needs to go on importing the standard library: the stdlib directories (minus
any site-packages inside them), the shared libraries its extension modules link against
(found with ``ldd``), the dynamic loader's cache, and a few devices. Everything else on
the host (projects, datasets, home directories, ``/opt``, ``/etc``, host sockets under
``/run``) does not exist there. ``inside/view.py`` builds that root from this list.

Nothing here is executed as a shell string; ``ldd`` runs on the interpreter's own
extension modules only.
"""

from __future__ import annotations

import functools
import glob
import os
import subprocess
import sys
import sysconfig

DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# Used when ldd is missing or fails: whole system library directories (less tight, same safety
# for secrets: these hold only system libraries).
_SYSTEM_LIB_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64")


def stdlib_dirs() -> list[str]:
    """The interpreter's standard library directories (of the base install, not a venv)."""
    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
                                      "installed_base": sys.base_prefix,
                                      "installed_platbase": sys.base_exec_prefix})
    out = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib")}
    out |= {os.path.realpath(p) for p in sys.path if p and "lib-dynload" in p}
    out = {p for p in out if os.path.isdir(p)}
    return sorted(p for p in out if not any(p != q and p.startswith(q + "/") for q in out))


def _extension_modules(dirs: list[str]) -> list[str]:
    found: list[str] = []
    for d in dirs:
        found += glob.glob(os.path.join(d, "*.so")) + glob.glob(os.path.join(d, "lib-dynload", "*.so"))
    return sorted(set(found))


def _ldd_libraries(modules: list[str]) -> list[str] | None:
    """Paths the dynamic loader opens for ``modules``' dependencies (a symlink's target is
    bound at the symlink's path); None if ldd is unavailable."""
    if not modules:
        return []
    try:
        out = subprocess.run(["ldd", *modules], capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin", "LANG": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    libs: set[str] = set()
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if len(parts) >= 3 and parts[1] == "=>" else parts[0] if parts else ""
        if path.startswith("/") and os.path.isfile(path):
            libs.add(path)
    return sorted(libs) if libs else None


@functools.lru_cache(maxsize=8)
def filesystem_view(cover: tuple[str, ...] = ()) -> dict[str, list[str] | str]:
    """``{"dirs", "files", "devices", "cover", "libs"}``: directories and files bind-mounted
    read-only into the sandbox's root, devices bound in, directories inside those covered by
    an empty tmpfs (site-packages, and ``cover``), and how the libraries were found."""
    dirs = stdlib_dirs()
    libs = _ldd_libraries(_extension_modules(dirs))
    how = "ldd"
    if libs is None:
        how = "system library directories (ldd unavailable)"
        dirs += [os.path.realpath(d) for d in _SYSTEM_LIB_DIRS if os.path.isdir(d)]
        dirs = sorted(set(dirs))
        libs = []
    files = libs + [f for f in ("/etc/ld.so.cache",) if os.path.isfile(f)]
    hide: list[str] = []
    for d in dirs:
        for name in ("site-packages", "dist-packages"):
            hide += glob.glob(os.path.join(d, name))
    for path in cover:
        path = os.path.realpath(path)
        if any(path.startswith(d + "/") for d in dirs) and os.path.isdir(path):
            hide.append(path)
    return {"dirs": dirs, "files": sorted(set(files)), "devices": [d for d in DEVICES if os.path.exists(d)],
            "cover": sorted(set(hide)), "libs": how}
