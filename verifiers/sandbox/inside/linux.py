"""Linux system calls the sandbox needs (ctypes): namespaces, mounts, prctl, seccomp,
capabilities, rlimits. Where a call is missing (not Linux) it raises ``OSError(ENOSYS)``
and the layer that needs it reports itself off.
"""

from __future__ import annotations

import os


CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38

_libc = None


def libc():
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def call(name: str, *args) -> None:
    import ctypes
    import errno

    fn = getattr(libc(), name, None)
    if fn is None:  # not Linux: every layer that needs it reports itself off
        raise OSError(errno.ENOSYS, f"{name}: not available on this system")
    if fn(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    call("unshare", flags)


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    call("mount", enc(src), enc(target), enc(fstype), flags, enc(data))


def umount_detached(target: str) -> None:
    call("umount2", target.encode(), 2)  # MNT_DETACH


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2) (glibc has no wrapper): ``new_root`` becomes ``/``."""
    import ctypes
    import errno
    import platform

    nr = _SECCOMP_ARCH.get(platform.machine(), (0, 0, 0, 0, False, 0))[5]
    if not nr:
        raise OSError(errno.ENOSYS, "pivot_root: unknown syscall number on this machine")
    if libc().syscall(ctypes.c_long(nr), new_root.encode(), put_old.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root: {os.strerror(err)}")


def prctl(option: int, arg: int) -> None:
    import ctypes

    call("prctl", option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


# seccomp: refuse socket() and connect() of every family (AF_UNIX included: a pathname or
# abstract Unix socket of a host service is a way out), io_uring, x32 and foreign-ABI
# syscalls. Sockets made before the filter (the RPC and control socketpairs) keep working;
# socketpair() stays allowed (it makes only a connected pair, nothing it can reach).
# Also refused: new namespaces (unshare, setns, clone with a CLONE_NEW* flag; clone3, whose
# flags a filter cannot read, answers ENOSYS so libc falls back to clone) and mount, umount2,
# pivot_root: in its own user namespace a program could mount a tmpfs of unbounded size,
# memory no rlimit counts, which outlives the program (3 GB in an audit, memory_mb=256). And
# memfd_create: anonymous files are memory outside RLIMIT_AS too.
_SECCOMP_ARCH = {  # machine -> (AUDIT_ARCH, socket, connect, io_uring_setup, has x32 bit, pivot_root)
    "x86_64": (0xC000003E, 41, 42, 425, True, 155),
    "aarch64": (0xC00000B7, 198, 203, 425, False, 41),
}
# machine -> (unshare, setns, mount, umount2, memfd_create, clone, clone3)
_SECCOMP_MORE = {
    "x86_64": (272, 308, 165, 166, 319, 56, 435),
    "aarch64": (97, 268, 40, 39, 279, 220, 435),
}
# Kernel memory no process's resident size shows (init's budget, pid1.py, cannot count it):
# SysV shared memory and message queues, socket buffers raised by setsockopt(SO_SNDBUF...)
# (3.9 GB held through socketpairs in an audit), pipes enlarged by fcntl(F_SETPIPE_SZ).
# machine -> (shmget, msgget, setsockopt, fcntl)
_SECCOMP_KMEM = {
    "x86_64": (29, 68, 54, 72),
    "aarch64": (194, 186, 208, 25),
}
_F_SETPIPE_SZ = 1031
_CLONE_NEW_FLAGS = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET


_SECCOMP: list = []  # [(fprog, filter array)] built once (in the zygote), reused by every fork


def seccomp_program():
    import ctypes
    import errno
    import platform

    if _SECCOMP:
        return _SECCOMP[0]
    spec = _SECCOMP_ARCH.get(platform.machine())
    if spec is None:
        _SECCOMP.append(None)
        return None
    arch, nr_socket, nr_connect, nr_uring, x32, nr_pivot = spec
    nr_unshare, nr_setns, nr_mount, nr_umount, nr_memfd, nr_clone, nr_clone3 = _SECCOMP_MORE[platform.machine()]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM
    deny_net = 0x00050000 | errno.EACCES
    nosys = 0x00050000 | errno.ENOSYS
    # (code, jt, jf, k); jump offsets are relative to the next instruction.
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, deny), (ld, 0, 0, 0)]
    if x32:
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, deny)]
    prog += [(jeq, 0, 1, nr_uring), (ret, 0, 0, deny),
             (jeq, 0, 1, nr_socket), (ret, 0, 0, deny_net),
             (jeq, 0, 1, nr_connect), (ret, 0, 0, deny_net)]
    nr_shmget, nr_msgget, nr_setsockopt, nr_fcntl = _SECCOMP_KMEM[platform.machine()]
    for nr in (nr_unshare, nr_setns, nr_mount, nr_umount, nr_pivot, nr_memfd, nr_shmget, nr_msgget, nr_setsockopt):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, deny)]
    # fcntl(fd, F_SETPIPE_SZ, ...): args[1] at offset 24; every other fcntl is allowed
    prog += [(jeq, 0, 3, nr_fcntl), (ld, 0, 0, 24), (jeq, 0, 1, _F_SETPIPE_SZ), (ret, 0, 0, deny),
             (ld, 0, 0, 0)]
    prog += [(jeq, 0, 1, nr_clone3), (ret, 0, 0, nosys),
             # clone: its flags are args[0]; the low 32 bits sit at offset 16 (little-endian)
             (jeq, 0, 3, nr_clone), (ld, 0, 0, 16), (jset, 0, 1, _CLONE_NEW_FLAGS), (ret, 0, 0, deny),
             (ret, 0, 0, allow)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    arr = (Filter * len(prog))(*[Filter(*ins) for ins in prog])
    _SECCOMP.append((Prog(len(prog), arr), arr))
    return _SECCOMP[0]


def install_seccomp() -> bool:
    import ctypes

    built = seccomp_program()
    if built is None:
        return False
    try:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        call("prctl", PR_SET_SECCOMP, ctypes.c_ulong(2), ctypes.byref(built[0]), ctypes.c_ulong(0),
             ctypes.c_ulong(0))
    except OSError:
        return False
    return True


def socketpair() -> tuple[int, int]:
    import socket

    a, b = socket.socketpair()
    return a.detach(), b.detach()


def set_rlimit(name: str, soft: int, hard: int | None = None) -> None:
    import resource

    res = getattr(resource, name)
    cur_soft, cur_hard = resource.getrlimit(res)
    hard = soft if hard is None else hard
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
        soft = min(soft, hard)
    resource.setrlimit(res, (soft, hard))


def drop_capabilities() -> None:
    import ctypes

    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2): all empty
    call("capset", header, data)


def count_own_processes() -> int:
    uid, n = os.getuid(), 0
    try:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    n += os.stat(f"/proc/{entry}").st_uid == uid
                except OSError:
                    pass
    except OSError:
        return 1024
    return n
