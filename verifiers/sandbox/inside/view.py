"""What a sandboxed process sees of the filesystem: a fresh root built from an allow-list.

``enter_view`` (called by init for the program, and by the harness for the tests, each
in its own mount namespace) makes a private mount namespace whose root is a new tmpfs
holding only the caller's allow-list (``verifiers/sandbox/allowlist.py``), bind-mounted
read-only, plus a private writable tmpfs on ``/tmp`` and, for the program, a ``/proc``
of its PID namespace. The host's root is detached afterwards, so no other host path
(projects, datasets, home directories, ``/opt``, ``/etc``, host sockets) exists there.
"""

from __future__ import annotations

import os
from typing import Any

from .linux import CLONE_NEWNS, MS_BIND, MS_MOVE, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, \
    MS_REC, MS_REMOUNT, call, mount, pivot_root, umount_detached, unshare

_STAGE = "/tmp"  # any existing directory: in the new namespace a tmpfs covers it (unseen by the host)
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
# [True] in a zygote (and its forks) that built the view once: later views only copy it.
TEMPLATE: list[bool] = []


def _locked_flags(path: str) -> int:
    """The source mount's flags, which a bind remount inside a user namespace must keep."""
    try:
        f = os.statvfs(path).f_flag
    except OSError:
        return 0
    pairs = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
             (os.ST_NOATIME, _MS_NOATIME), (os.ST_NODIRATIME, _MS_NODIRATIME),
             (getattr(os, "ST_RELATIME", 4096), _MS_RELATIME))
    return sum(ms for st, ms in pairs if f & st)


def _bind(src: str, root: str, device: bool = False) -> None:
    dst = root + src
    if os.path.isdir(src):
        os.makedirs(dst, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
        if not os.path.exists(dst):
            os.close(os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644))
    mount(src, dst, None, MS_BIND)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | _locked_flags(src)
    mount(None, dst, None, flags if device else flags | MS_NODEV)


def enter_view(view: dict[str, Any], tmp_mb: int, proc: bool, layers: dict[str, Any]) -> None:
    """Replace this process's root by the allow-listed view (new mount namespace). Raises
    OSError if a step fails; the caller then falls back and reports it."""
    if TEMPLATE:  # already inside the view (forked from a zygote that built it): copy it
        unshare(CLONE_NEWNS)
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_mb}m,nr_inodes=4096,mode=1777")
        layers["private_proc"] = False
        if proc:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            layers["private_proc"] = True
        layers["readonly_root"] = True  # remounted read-only by the zygote
        layers["view_built"] = "once, by the zygote"
        return
    layers["view_built"] = "for this run"
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    os.umask(0o022)  # the directories made here must be traversable by the unprivileged uids
    root = _STAGE
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
    for path in view["dirs"]:
        _bind(path, root)  # the stdlib: without it nothing works, so a failure is fatal
    skipped = []
    for path in view["files"] + view["devices"]:  # a missing library or device costs only itself
        try:
            _bind(path, root, device=path in view["devices"])
        except OSError:
            skipped.append(path)
    if skipped:
        layers["view_skipped"] = skipped
    for path in view["cover"]:  # site-packages inside the stdlib: an empty read-only tmpfs
        if os.path.isdir(root + path):
            mount("tmpfs", root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  "size=4k,nr_inodes=16,mode=755")
    os.mkdir(root + "/tmp", 0o1777)
    mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_mb}m,nr_inodes=4096,mode=1777")
    layers["private_proc"] = False
    os.mkdir(root + "/proc", 0o555)  # also in a zygote's view: each run mounts its own there
    if proc:
        try:
            mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            layers["private_proc"] = True
        except OSError:
            pass
    _switch_root(root)
    try:
        mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        layers["readonly_root"] = True
    except OSError:
        layers["readonly_root"] = False


def _switch_root(root: str) -> None:
    """Make ``root`` the root directory and drop every other host mount from view."""
    old = root + "/.old-root"
    os.mkdir(old, 0o700)
    try:
        pivot_root(root, old)
        os.chdir("/")
        umount_detached("/.old-root")
        os.rmdir("/.old-root")
    except OSError:  # e.g. an initramfs root, where pivot_root is refused: move + chroot
        os.rmdir(old)
        os.chdir(root)
        mount(root, "/", None, MS_MOVE)
        call("chroot", b".")
        os.chdir("/")


def setup_mounts(hdr: dict[str, Any], mode: str, layers: dict[str, Any]) -> str:
    """The program's filesystem: the allow-listed view with ``/tmp`` (its working directory),
    or, without a mount namespace, a temporary directory on the host (the whole host
    filesystem then stays visible: the documented degradation of mode ``none``)."""
    import tempfile

    lim = hdr["limits"]
    layers["mountns"] = False
    if mode != "none":
        try:
            enter_view(hdr["view"], lim["tmpfs_mb"], True, layers)
            layers["mountns"] = True
            layers["view"] = "allow-list"
            return "/tmp"
        except OSError as exc:
            layers["mount_error"] = str(exc)
    layers["view"] = "host (no mount namespace)"
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    if mode == "root":
        os.chown(workdir, hdr["uid"], hdr["uid"])
    return workdir
