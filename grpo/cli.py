"""The ``grpo`` command line. Heavy imports happen inside the subcommands so ``grpo --help`` is instant.

    grpo train CONFIG [key=value ...] [--resume]
    grpo eval --task NAME --model SPEC [--adapter DIR ...] --n 16 --k 1,4,16
    grpo verify --verifier NAME --input FILE.jsonl
    grpo list [tasks|verifiers|tools|environments]
    grpo export RUN_DIR OUT
    grpo rm train ...

User mistakes print ``error: <one line>`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any, Callable

from grpo.errors import PeerFailed, UserError

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def wrap(fn):
        _COMMANDS[name] = fn
        return fn

    return wrap


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo", description="GRPO / RLVR training of LoRA adapters.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a LoRA adapter with GRPO from a YAML config")
    p.add_argument("config", nargs="?", help="YAML config (configs/*.yaml); omit with --help-config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.beta=0.0 steps=10")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type, default and help")

    p = sub.add_parser("verify", help="score completions from a JSONL file with a verifier (JSON lines out)")
    p.add_argument("--verifier", required=True, help="verifier name (grpo list verifiers), module:attr, or a TRL/verl/prime-rl reward "
                                                           "function as file.py:function")
    p.add_argument("--input", help="JSONL rows: completion + the verifier's fields ('-' = stdin)")
    p.add_argument("--args", default="{}", help="verifier constructor arguments as JSON, e.g. '{\"rel_tol\": 1e-6}'")
    p.add_argument("--workers", type=int, default=2, help="worker processes for isolated verifiers")
    p.add_argument("--plugins", action="append", default=[],
                   help="python file or module name to import (registers tasks/verifiers)")
    from grpo.audit import add_audit_arguments  # light: no torch at import

    add_audit_arguments(p)

    p = sub.add_parser("list", help="list registered tasks and verifiers with their source")
    p.add_argument("what", nargs="?", choices=["tasks", "verifiers", "tools", "environments"],
                   help="only that kind")
    p.add_argument("--plugins", action="append", default=[],
                   help="python file or module name to import (registers tasks/verifiers/tools)")

    from grpo.evaluate_cli import add_eval_parser, run_eval  # light: no torch at import

    add_eval_parser(sub)
    command("eval")(run_eval)

    from grpo.export import add_export_parser, run_export  # light: no torch at import

    add_export_parser(sub)
    command("export")(run_export)

    from grpo.rm.cli import add_rm_parser, run_rm  # light: no torch at import

    add_rm_parser(sub)
    command("rm")(run_rm)

    return parser


@command("train")
def _train(args: argparse.Namespace) -> int:
    from grpo.config import describe, load_config

    if args.help_config:
        print("\n".join(describe()))
        return 0
    if not args.config:
        raise UserError("grpo train needs a CONFIG file (see configs/), e.g. grpo train configs/arith.yaml")
    cfg = load_config(args.config, args.overrides)
    from grpo.trainer import run

    summary = run(cfg, resume=args.resume, progress=not args.no_progress)
    from grpo.dist import launch_rank

    if launch_rank() != 0:  # under torchrun, rank 0 reports
        return 0
    print(f"run directory: {cfg.run_dir}")
    if "before" in summary and "after" in summary:
        from grpo.trainer import before_after_table

        print(before_after_table(summary["before"], summary["after"]))
    return 0


@command("verify")
def _verify(args: argparse.Namespace) -> int:
    from grpo.build import load_plugins
    from grpo.registry import target_plugins
    from grpo.rewards import RewardRunner

    load_plugins(args.plugins + target_plugins(args.verifier or ""))  # --verifier FILE.py:fn names its code
    from grpo.config import json_object_arg

    if args.audit:
        from grpo.audit import run_audit_command

        return run_audit_command(args, _read_verify_rows)
    if not args.input:
        raise UserError("grpo verify needs --input FILE.jsonl (or --audit with --task NAME)")
    vargs = json_object_arg(args.args, "--args")
    rows = _read_verify_rows(args.input)
    name = args.verifier
    with RewardRunner({name: vargs}, workers=args.workers) as runner:
        verifier = runner.verifier(name)
        for i, row in enumerate(rows, 1):
            check = getattr(verifier, "missing_fields", None)  # a verl function: its ground truth's sources
            missing = check(row) if check else [f for f in getattr(verifier, "required_fields", verifier.fields)
                                                 if f not in row]
            if "completion" not in row or missing:
                raise UserError(f"{args.input}:{i}: row needs 'completion' and {list(verifier.fields)}; missing "
                                f"{(['completion'] if 'completion' not in row else []) + missing}")
        batch = runner.score([{**row, "verifiers": {name: 1.0}} for row in rows], [str(r["completion"]) for r in rows])
        for i in range(len(rows)):
            print(json.dumps({"reward": batch.per_verifier[name][i], "reason": batch.reasons[name][i]}))
        print(f"scored {len(rows)} rows, mean reward {sum(batch.total) / max(1, len(rows)):.3f}, "
              f"errors {batch.errors.get(name, 0)}", file=sys.stderr)
    return 0


def _read_verify_rows(path: str) -> list[dict[str, Any]]:
    from tasks.loaders import read_jsonl

    rows = [row for _, row in read_jsonl(path, what="input file")]
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


@command("list")
def _list(args: argparse.Namespace) -> int:
    from grpo.build import load_plugins
    from grpo.registry import ENVIRONMENTS, TASKS, TOOLS, VERIFIERS

    load_plugins(args.plugins)
    for title, registry in (("tasks", TASKS), ("verifiers", VERIFIERS), ("tools", TOOLS),
                            ("environments", ENVIRONMENTS)):
        if args.what and args.what != title:
            continue
        print(f"{title}:")
        entries = registry.entries()
        width = max((len(n) for n in entries), default=0)
        for name, entry in entries.items():
            fields = getattr(entry.obj, "fields", None)
            extra = f" [fields: {', '.join(fields)}]" if title == "verifiers" and fields else ""
            print(f"  {name:<{width}}  {entry.description}{extra}  ({entry.source})")
        for name, error in registry.failures().items():
            print(f"  {name:<{width}}  FAILED TO LOAD: {error}")
    return 0


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that ``key=value`` overrides may also follow flags
    (``grpo train CONFIG --resume steps=24``): argparse gives a ``nargs="*"`` positional only
    the words before the first flag, and calls the rest unrecognized."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``docker stop``, Kubernetes and SLURM send SIGTERM before SIGKILL):
    stopped as Ctrl-C stops a run (cleanup, the checkpoint on disk is what resumes). A
    KeyboardInterrupt, so every cleanup that handles Ctrl-C handles it too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _handle_termination() -> dict[int, Any]:
    """SIGTERM/SIGHUP raise ``Terminated`` where they would kill the process silently (or, as a
    container's pid 1, be ignored: the run went on until the grace period's SIGKILL). Returns
    the handlers replaced, for ``main`` to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    replaced = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            replaced[sig] = signal.signal(sig, _raise_terminated)
    return replaced


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parse_args(parser, argv)
    if not args.command:
        parser.print_help()
        return 2
    replaced = _handle_termination()
    try:
        code = _COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"error: {exc}\n")  # one write: ranks' lines do not interleave
        code = 2
    except Terminated as exc:
        sys.stderr.write(f"terminated ({exc})\n")
        code = 128 + exc.signum
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = 130
    except BrokenPipeError:  # `grpo verify ... | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        code = 128 + signal.SIGPIPE
    except PeerFailed:  # under torchrun: another rank failed and said why; this one said so (grpo.dist.fail)
        code = 1
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)
    dist = sys.modules.get("grpo.dist")  # loaded (with torch) only by commands that can join a group
    return dist.finish(code) if dist else code  # a torchrun rank exits in finish; one process returns


if __name__ == "__main__":
    sys.exit(main())
