"""Data-parallel plumbing over ``torch.distributed``: who am I, named collectives, launch/teardown.

One process without a launcher is world size 1 and every helper here is a no-op or an
identity, so the trainer reads the same at any world size. Under ``torchrun`` (or
``accelerate launch``, or SLURM ``srun`` exporting the same variables) the process group
is initialised from the environment (``env://``: RANK, WORLD_SIZE, MASTER_ADDR, ...) with
gloo on CPU and NCCL on CUDA.

Every function whose name starts with ``all_``, ``broadcast`` or ``barrier`` is a
collective: all ranks must call it, in the same order.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as tdist

from grpo.errors import UserError

_SETTLE_S = 0.1  # teardown: GIL-free time for gloo's worker threads to release finished work (``teardown``)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def slice(self, count: int) -> range:
        """This rank's contiguous share of ``count`` items (``count`` divisible by the world size)."""
        per = count // self.world_size
        return range(self.rank * per, (self.rank + 1) * per)

    def share(self, count: int) -> range:
        """This rank's contiguous share of ``count`` items, sizes differing by at most one."""
        per, extra = divmod(count, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (self.rank < extra))


def launch_rank() -> int:
    """The rank the launcher gave this process (0 without a launcher); readable before and after ``init``."""
    return int(os.environ.get("RANK", 0)) if launched() else 0


def launched() -> bool:
    """True when a launcher (torchrun, accelerate, srun wrappers) set the env:// variables."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def info() -> DistInfo:
    """Rank, world size and local rank of this process (world size 1 without a process group)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return DistInfo()
    return DistInfo(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init(timeout_s: float, device: str = "cpu") -> DistInfo:
    """Join the process group described by the environment; world size 1 when not launched.

    ``device`` picks the backend: NCCL for CUDA (each rank on ``cuda:LOCAL_RANK``), gloo otherwise.
    ``timeout_s`` bounds every collective, so a rank that stops answering fails the job
    instead of hanging it.
    """
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1 and int(os.environ["RANK"]) == 0:
        return DistInfo()
    if tdist.is_initialized():
        return info()
    if device.startswith("cuda:"):
        raise UserError(f"model.device={device} under a launcher would put every rank on the same GPU; use "
                        "model.device=auto or cuda (each rank takes cuda:LOCAL_RANK)")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    bound = {}
    if cuda:
        # cuda:LOCAL_RANK; modulo the visible count where a launcher shows each process its own GPU(s)
        # (srun --gpus-per-task=1: every rank sees one device, cuda:0)
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(local)
        bound = {"device_id": local}  # NCCL's communicator on this rank's GPU, created now, not guessed later
    # torch 2.13: importing torch._dynamo once a group exists keeps that group alive after
    # destroy_process_group, its gloo threads running into interpreter exit (DDP's constructor
    # imports it). Imported before the group, teardown frees the group and joins its threads.
    # (importlib: an `import torch._dynamo` statement would make `torch` a local name of this
    # function, unbound above, and `model.device: auto` fail with UnboundLocalError.)
    importlib.import_module("torch._dynamo")

    tdist.init_process_group("nccl" if cuda else "gloo", init_method="env://", timeout=timedelta(seconds=timeout_s),
                             **bound)
    global _joined
    _joined = True
    return info()


_joined = False  # this process created a process group (``init``): it ends through ``finish``


def teardown() -> None:
    """Leave the process group at the end of a successful run, all ranks together.

    The barrier keeps a rank that finished first (rank 1 while rank 0 still writes the adapter)
    from tearing down its transport while a peer is still connected. The process then ends
    through ``finish``. On the failure path ``fail`` has already left the group, so this is a
    no-op there.

    After the barrier this thread sleeps briefly, releasing the GIL: gloo's worker thread
    releases a finished collective's tensors after ``wait`` returns, and takes the GIL to do it.
    Whoever then drops the group's last reference (``destroy_process_group``, or a DDP reducer
    collected later, e.g. by ``gc.collect``) joins that worker while holding the GIL; if the
    worker had not finished, both waited forever (tests/dist_step_worker.py hung that way in
    about one run in five under the test suite, in ``~ProcessGroupGloo`` -> ``thread::join`` against
    ``~AsyncBarrierWork`` -> ``gil_scoped_acquire``).
    """
    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.barrier()  # bounded by the group's timeout (distributed.timeout_s)
            time.sleep(_SETTLE_S)
        finally:
            tdist.destroy_process_group()


# how a collective says its peer went away (gloo; NCCL's watchdog aborts the process itself)
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def fail(exc: BaseException) -> bool:
    """Report a failure on stderr with this rank's number and leave the process group at once;
    True when the failure is another rank's (a collective lost its peer), reported as such.

    No barrier: the other ranks may be waiting in a collective. The launcher sees this
    process exit non-zero and stops the others, so the job ends instead of hanging.
    """
    me = info()
    if not me.enabled:
        return False
    lost = isinstance(exc, RuntimeError) and any(s in str(exc) for s in _PEER_LOST)
    if lost:
        print(f"rank {me.rank}/{me.world_size} stopped: another rank failed (its error is above)", file=sys.stderr,
              flush=True)
    elif isinstance(exc, KeyboardInterrupt):  # the launcher's SIGTERM after another rank failed, or Ctrl-C
        print(f"rank {me.rank}/{me.world_size} stopped ({exc or 'SIGINT'})", file=sys.stderr, flush=True)
        lost = True
    elif not isinstance(exc, UserError):  # a UserError gets its one `error:` line from the CLI
        print(f"rank {me.rank}/{me.world_size} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    try:
        tdist.destroy_process_group()
    except Exception:  # the group may already be broken; exiting is what matters
        pass
    return lost


def finish(code: int) -> int:
    """Return ``code``; a process that joined a group (``init``) exits with it here instead.

    A rank leaves without Python's interpreter finalization (streams and logging flushed,
    then ``os._exit``). Gloo's ``shutdown`` is a no-op: its worker threads stop only when the
    last reference to the group goes, and anything in torch that keeps one (torch 2.13:
    importing torch._dynamo after the group was created, which ``init`` prevents; FSDP2's
    ``fully_shard``, even after its module is freed) leaves them running into finalization, where a thread that releases a finished collective's
    tensors takes the GIL and is ended mid-C++ frame: "terminate called without an active
    exception", SIGABRT, a successful run reported failed by torchrun (CI saw it once).
    Everything a run writes is closed before this point (``Trainer.cleanup``).
    """
    if not _joined:
        return code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be written
            pass
    logging.shutdown()
    os._exit(code)


def check_divisible(count: int, key: str, me: DistInfo) -> None:
    if count % me.world_size:
        raise UserError(f"config: {key} ({count}) must be divisible by the number of ranks ({me.world_size}); "
                        f"use a multiple of {me.world_size} or launch another number of processes")


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only."""
    if info().is_main:
        print(*args, **kwargs)


def _comm_device() -> torch.device:
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: Sequence[float], op) -> list[float]:
    if not info().enabled:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks (float64). Identity at world size 1."""
    return _all_reduce(values, tdist.ReduceOp.SUM)


def all_reduce_max(values: Sequence[float]) -> list[float]:
    """Element-wise maximum over ranks. Identity at world size 1."""
    return _all_reduce(values, tdist.ReduceOp.MAX)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order. ``[obj]`` at world size 1."""
    if not info().enabled:
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_gather_concat(items: Sequence[Any]) -> list[Any]:
    """The concatenation of every rank's list, in rank order (rank 0's items first)."""
    return [x for part in all_gather_objects(list(items)) for x in part]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not info().enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait until every rank reaches this point."""
    if info().enabled:
        tdist.barrier()
