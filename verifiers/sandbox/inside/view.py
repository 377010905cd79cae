"""What the program sees of the filesystem: its mount namespace, built by init."""

from __future__ import annotations

import os
import sys
from typing import Any

from .linux import CLONE_NEWNS, MS_BIND, MS_MOVE, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, \
    MS_REC, MS_REMOUNT, mount, unshare


def stdlib_dirs() -> list[str]:
    """The interpreter's standard library directories (of the base install, not a venv)."""
    import sysconfig

    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
                                      "installed_base": sys.base_prefix,
                                      "installed_platbase": sys.base_exec_prefix})
    out = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib")}
    out |= {os.path.realpath(p) for p in sys.path if p and "lib-dynload" in p}
    out = {p for p in out if os.path.isdir(p)}
    return sorted(p for p in out if not any(p != q and p.startswith(q + "/") for q in out))


def setup_mounts(hdr: dict[str, Any], mode: str, layers: dict[str, Any]) -> str:
    """Private mount namespace: a tmpfs working directory, tmpfs over /tmp-like and hidden
    directories, a /proc of the new PID namespace, the rest read-only."""
    import tempfile

    lim = hdr["limits"]
    layers["mountns"] = False
    if mode != "none":
        try:
            unshare(CLONE_NEWNS)
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
                   f"size={lim['tmpfs_mb']}m,nr_inodes=4096,mode=1777")
            if mode == "root":
                layers["stdlib_exposed"] = _expose_stdlib()
            hidden = []
            for path in ["/var/tmp", "/dev/shm", "/run/lock", *hdr.get("hide", [])]:
                if os.path.isdir(path) and not path.startswith("/tmp"):
                    try:
                        mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                               "size=4k,nr_inodes=16,mode=755")
                        hidden.append(path)
                    except OSError:
                        pass
            layers["hidden"] = [p for p in hidden if p in hdr.get("hide", [])]
            try:
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                layers["private_proc"] = True
            except OSError:
                layers["private_proc"] = False
            try:
                mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
                layers["readonly_root"] = True
            except OSError:
                layers["readonly_root"] = False
            layers["mountns"] = True
            return "/tmp"
        except OSError as exc:
            layers["mount_error"] = str(exc)
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    if mode == "root":
        os.chown(workdir, hdr["uid"], hdr["uid"])
    return workdir


def _expose_stdlib() -> list[str]:
    """Make the stdlib readable by the unprivileged uid when it sits under a private
    directory (pyenv in /root, mode 700): a tmpfs over that directory with the stdlib
    bind-mounted back in. Also hides the rest of that directory."""
    need, exposed = stdlib_dirs(), []
    for path in need:
        parts = path.split("/")
        for i in range(2, len(parts)):
            anc = "/".join(parts[:i])
            if os.stat(anc).st_mode & 0o001:
                continue
            stage = f"/tmp/.sandbox-stage-{os.getpid()}"
            os.makedirs(stage, exist_ok=True)
            # bind every needed path under `anc` to the stage, cover `anc`, move them back
            under = [q for q in need if q.startswith(anc + "/")]
            staged = []
            for j, q in enumerate(under):
                s = f"{stage}/{j}"
                os.mkdir(s)
                mount(q, s, None, MS_BIND | MS_REC)
                staged.append((s, q))
            mount("tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,nr_inodes=256,mode=755")
            for s, q in staged:
                os.makedirs(q, mode=0o755, exist_ok=True)
                mount(s, q, None, MS_MOVE)
                os.rmdir(s)
            os.rmdir(stage)
            mount(None, anc, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
            exposed += [f"{q} (under a tmpfs over {anc})" for q in under]
            break
    return exposed
