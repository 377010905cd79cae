"""``grpo verify --audit``: is a verifier sound on this task's data, before a long run?

For each row with a reference answer (``answer``, else ``ground_truth``) the audit
writes completions in the formats models use (``\\boxed{}``, "The answer is", answer
tags, a worked solution ending in a box, ``####``): each must score 1, or it is a
**false negative**. It then writes wrong answers that a loose checker accepts (off by
one, sign flipped, an extra digit, hedged "a or b", two boxes, empty): each must score
below 1, or it is a **false positive**. Rows with code tests get an empty and a stub
completion as wrong answers (and their ``solution`` / ``canonical_solution`` column, if
any, as gold), and a code verifier (one that reads ``tests``) is run on the package's
reward-hacking probes (``verifiers/hack_probes.py``); any probe scoring above 0 is
listed. Errors, timeouts, latency percentiles (sequential single calls) and throughput
(one batched call, as in training) are measured with the same ``RewardRunner`` the
trainer uses. The report is JSON + markdown; thresholds on the rates turn it into a
gate (exit status 1).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from grpo.errors import UserError

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORDS = re.compile(r"[A-Za-z ,.'-]+")  # a text answer ("Tuesday"): arithmetic perturbations make no sense
CODE_FIELDS = ("tests", "io_cases")


@dataclass
class Case:
    kind: str  # "gold" | "perturbed" | "probe"
    label: str  # the format, perturbation or probe name
    row: int  # index into the audited rows (-1 for probes)
    completion: str
    reward: float | None = None
    reason: str = ""


# --------------------------------------------------------------------- completions
def gold_formats(answer: str) -> list[tuple[str, str]]:
    """(label, completion) pairs stating ``answer`` as models write it; all must score 1."""
    return [
        ("boxed", f"$\\boxed{{{answer}}}$"),
        ("answer_is", f"The answer is {answer}."),
        ("answer_tags", f"<think>Working it out.</think>\n<answer>{answer}</answer>"),
        ("worked_solution", f"Let's think step by step. First 2 + 3 = 5, then 5 - 1 = 4.\n"
                            f"So the final answer is $\\boxed{{{answer}}}$."),
        ("hashes", f"Adding it all up.\n#### {answer}"),
    ]


def _shifted(answer: str, delta: int) -> str:
    if _NUMBER.fullmatch(answer):
        value = Fraction(answer) + delta
        return str(value.numerator) if value.denominator == 1 else str(float(value))
    return f"{answer} + {delta}" if delta >= 0 else f"{answer} - {-delta}"


def perturbations(answer: str) -> list[tuple[str, str]]:
    """(label, completion) pairs with a wrong or hedged answer; each must score below 1."""
    answer = answer.strip()
    out: list[tuple[str, str]] = []
    arithmetic = bool(answer) and not _WORDS.fullmatch(answer) and "\\text" not in answer
    if arithmetic:
        other = _shifted(answer, 1)
        out.append(("off_by_one", f"The answer is $\\boxed{{{other}}}$."))
        out.append(("off_by_minus_one", f"The answer is $\\boxed{{{_shifted(answer, -1)}}}$."))
        is_zero = _NUMBER.fullmatch(answer) is not None and Fraction(answer) == 0
        if not is_zero:
            flipped = answer[1:] if answer.startswith("-") and _NUMBER.fullmatch(answer) else (
                f"-{answer}" if _NUMBER.fullmatch(answer) else f"-({answer})")
            out.append(("sign_flipped", f"The answer is $\\boxed{{{flipped}}}$."))
        if _NUMBER.fullmatch(answer):
            out.append(("extra_digit", f"The answer is $\\boxed{{{answer}7}}$."))
            leading = "-9" + answer[1:] if answer.startswith("-") else "9" + answer
            out.append(("extra_leading_digit", f"The answer is $\\boxed{{{leading}}}$."))
        # Both orders: a checker that takes the first number and one that takes the last are each fooled by one.
        out.append(("hedged", f"The answer is {answer} or {other}."))
        out.append(("hedged_reversed", f"The answer is {other} or {answer}."))
        out.append(("two_boxes", f"It is either $\\boxed{{{answer}}}$ or $\\boxed{{{other}}}$."))
        out.append(("two_boxes_reversed", f"It is either $\\boxed{{{other}}}$ or $\\boxed{{{answer}}}$."))
    else:
        out.append(("hedged", f"The answer is {answer} or something else."))
    out.append(("empty", ""))
    return out


def _reference(row: dict[str, Any]) -> str | None:
    for key in ("answer", "ground_truth"):
        value = row.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    return None


def build_cases(rows: Sequence[dict[str, Any]], reads_tests: bool, probe_attacks: bool) -> list[Case]:
    from verifiers.hack_probes import HOST_ATTACKS, PROBES

    cases: list[Case] = []
    for i, row in enumerate(rows):
        if any(row.get(f) for f in CODE_FIELDS):
            for key in ("solution", "canonical_solution"):
                if isinstance(row.get(key), str) and row[key].strip():
                    cases.append(Case("gold", key, i, row[key]))
            cases.append(Case("perturbed", "empty", i, ""))
            cases.append(Case("perturbed", "stub", i, "```python\npass\n```"))
            continue
        answer = _reference(row)
        if answer is None:
            continue
        cases += [Case("gold", label, i, text) for label, text in gold_formats(answer)]
        cases += [Case("perturbed", label, i, text) for label, text in perturbations(answer)]
    if reads_tests:
        for name, (program, _tests) in PROBES.items():
            if probe_attacks or name not in HOST_ATTACKS:
                cases.append(Case("probe", name, -1, f"```python\n{program}```"))
    return cases


def _case_row(case: Case, rows: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
    if case.kind == "probe":
        from verifiers.hack_probes import ENTRY_POINT, PROBES

        return {"prompt": "Write add(a, b).", "tests": PROBES[case.label][1], "entry_point": ENTRY_POINT,
                "verifiers": {name: 1.0}}
    return {**rows[case.row], "verifiers": {name: 1.0}}


# ----------------------------------------------------------------------- the audit
def audit(name: str, rows: Sequence[dict[str, Any]], runner, *, probe_attacks: bool = False,
          latency_samples: int = 20) -> dict[str, Any]:
    """Score the audit's cases with ``runner`` (a ``RewardRunner``); the report as a dict."""
    from grpo.rewards import CORRECT_THRESHOLD

    verifier = runner.verifier(name)
    reads_tests = "tests" in tuple(verifier.fields) + tuple(getattr(verifier, "required_fields", ()))
    cases = build_cases(rows, reads_tests, probe_attacks)
    if not cases:
        raise UserError(f"audit of {name!r}: no row has an 'answer'/'ground_truth' or code tests to build "
                        "cases from, and the verifier reads no tests (nothing to audit)")
    case_rows = [_case_row(c, rows, name) for c in cases]
    runner.check_rows(case_rows, f"audit of {name!r}")
    t0 = time.perf_counter()
    batch = runner.score(case_rows, [c.completion for c in cases])
    wall = time.perf_counter() - t0
    for c, reward, reason in zip(cases, batch.per_verifier[name], batch.reasons[name]):
        c.reward, c.reason = reward, reason
    latencies = []
    for c, row in list(zip(cases, case_rows))[:max(0, latency_samples)]:
        t = time.perf_counter()
        runner.score([row], [c.completion])
        latencies.append(1000 * (time.perf_counter() - t))

    def solved(c: Case) -> bool:
        return c.reward is not None and c.reward >= CORRECT_THRESHOLD

    gold = [c for c in cases if c.kind == "gold"]
    wrong = [c for c in cases if c.kind == "perturbed"]
    probes = [c for c in cases if c.kind == "probe"]
    fn = [c for c in gold if not solved(c)]
    fp = [c for c in wrong if solved(c)]
    errors = [c for c in cases if c.reason.startswith("error:")]
    timeouts = [c for c in errors if "timeout" in c.reason]
    by_label: dict[str, dict[str, int]] = {}
    for c in wrong:
        entry = by_label.setdefault(c.label, {"n": 0, "false_positives": 0})
        entry["n"] += 1
        entry["false_positives"] += solved(c)
    return {
        "verifier": name,
        "rows": len(rows),
        "cases": len(cases),
        "gold": {"n": len(gold), "false_negatives": len(fn), "rate": _rate(fn, gold),
                 "by_format": _count_by_label(gold, fn), "examples": _examples(fn, rows)},
        "perturbed": {"n": len(wrong), "false_positives": len(fp), "rate": _rate(fp, wrong),
                      "by_kind": by_label, "examples": _examples(fp, rows)},
        "probes": {"n": len(probes), "attacks_included": probe_attacks,
                   "scored_above_zero": [{"probe": c.label, "reward": c.reward, "reason": c.reason}
                                         for c in probes if (c.reward or 0) > 0]},
        "errors": {"n": len(errors), "rate": _rate(errors, cases), "examples": _examples(errors, rows)},
        "timeouts": {"n": len(timeouts), "rate": _rate(timeouts, cases)},
        "latency_ms": _percentiles(latencies),
        "throughput_per_s": len(cases) / wall if wall > 0 else None,
        "batch_wall_s": wall,
    }


def _rate(part: list, whole: list) -> float | None:
    return len(part) / len(whole) if whole else None


def _count_by_label(cases: list[Case], bad: list[Case]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for c in cases:
        out.setdefault(c.label, {"n": 0, "false_negatives": 0})["n"] += 1
    for c in bad:
        out[c.label]["false_negatives"] += 1
    return out


def _examples(cases: list[Case], rows: Sequence[dict[str, Any]], n: int = 10) -> list[dict[str, Any]]:
    out = []
    for c in cases[:n]:
        item = {k: v for k, v in asdict(c).items() if k != "row"}
        item["completion"] = item["completion"][:200]
        if c.row >= 0:
            item["answer"] = _reference(rows[c.row])
            item["row_id"] = rows[c.row].get("id", c.row)
        out.append(item)
    return out


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    s = sorted(values)

    def q(p: float) -> float:  # nearest-rank percentile
        return round(s[min(len(s) - 1, max(0, int(-(-p * len(s) // 1)) - 1))], 3)

    return {"n": len(s), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(s[-1], 3)}


# ------------------------------------------------------------------ gate and report
def failures(report: dict[str, Any], max_fn_rate: float, max_fp_rate: float, max_error_rate: float) -> list[str]:
    """Threshold breaches, one sentence each (empty: the verifier passes the audit)."""
    out = []
    checks = (("false-negative rate on gold answers", report["gold"]["rate"], max_fn_rate),
              ("false-positive rate on perturbed answers", report["perturbed"]["rate"], max_fp_rate),
              ("error rate (crashes and timeouts)", report["errors"]["rate"], max_error_rate))
    for what, rate, limit in checks:
        if rate is not None and rate > limit:
            out.append(f"{what} {rate:.3f} > {limit:g}")
    hits = report["probes"]["scored_above_zero"]
    if hits:
        out.append(f"{len(hits)} reward-hacking probe(s) scored above 0: {', '.join(h['probe'] for h in hits)}")
    return out


def markdown(report: dict[str, Any]) -> str:
    def pct(rate):
        return "n/a" if rate is None else f"{100 * rate:.1f} %"

    g, p, lat = report["gold"], report["perturbed"], report["latency_ms"]
    lines = [f"# Verifier audit: `{report['verifier']}`", "",
             f"{report['rows']} rows, {report['cases']} cases.", "",
             "| measure | value |", "|---|---|",
             f"| false negatives on gold answers | {g['false_negatives']} / {g['n']} ({pct(g['rate'])}) |",
             f"| false positives on perturbed answers | {p['false_positives']} / {p['n']} ({pct(p['rate'])}) |",
             f"| errors (of which timeouts) | {report['errors']['n']} ({report['timeouts']['n']}) "
             f"({pct(report['errors']['rate'])}) |",
             f"| reward-hacking probes above 0 | {len(report['probes']['scored_above_zero'])} / "
             f"{report['probes']['n']} |",
             f"| latency p50 / p90 / p99 / max (ms, {lat['n']} single calls) | {lat['p50']} / {lat['p90']} / "
             f"{lat['p99']} / {lat['max']} |",
             f"| throughput (cases/s, one batched call) | "
             f"{'n/a' if report['throughput_per_s'] is None else round(report['throughput_per_s'], 1)} |"]
    if p["by_kind"]:
        lines += ["", "| perturbation | cases | false positives |", "|---|---|---|"]
        lines += [f"| {k} | {v['n']} | {v['false_positives']} |" for k, v in sorted(p["by_kind"].items())]
    for title, examples in (("False negatives", g["examples"]), ("False positives", p["examples"]),
                            ("Errors", report["errors"]["examples"])):
        if examples:
            lines += ["", f"## {title} (first {len(examples)})", ""]
            lines += [f"- `{e['label']}` answer `{e.get('answer')}`: {json.dumps(e['completion'])} -> "
                      f"{e['reward']} ({e['reason']})" for e in examples]
    if report["probes"]["scored_above_zero"]:
        lines += ["", "## Reward-hacking probes that scored above 0", ""]
        lines += [f"- `{h['probe']}`: {h['reward']} ({h['reason']})" for h in report["probes"]["scored_above_zero"]]
    if report.get("failed"):
        lines += ["", "## Gate: FAILED", ""] + [f"- {f}" for f in report["failed"]]
    else:
        lines += ["", "Gate: passed."]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the directory ({exc.strerror})") from exc
    json_path, md_path = out / "audit.json", out / "audit.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


# ----------------------------------------------------------------------------- CLI
def add_audit_arguments(p) -> None:
    """The ``grpo verify --audit`` options (the verify parser's other options stay as they are)."""
    g = p.add_argument_group("audit (grpo verify --audit; docs/audit.md)")
    g.add_argument("--audit", action="store_true",
                   help="audit the verifier on rows from --task (or --input) instead of scoring completions")
    g.add_argument("--task", help="audit on this task's rows (registered name or module:attr)")
    g.add_argument("--task-args", default="{}", help="task arguments as JSON")
    g.add_argument("--split", default="train", choices=["train", "heldout"], help="task split to audit on")
    g.add_argument("--limit", type=int, default=200, help="audit at most this many rows (0 = all)")
    g.add_argument("--out", default="audit", help="directory for audit.json and audit.md")
    g.add_argument("--max-fn-rate", type=float, default=0.0, help="fail when the false-negative rate is above this")
    g.add_argument("--max-fp-rate", type=float, default=0.0, help="fail when the false-positive rate is above this")
    g.add_argument("--max-error-rate", type=float, default=0.0, help="fail when the error+timeout rate is above this")
    g.add_argument("--probe-attacks", action="store_true",
                   help="also run host-attacking probes (fork/memory bombs, kill...): only for sandboxing verifiers")
    g.add_argument("--latency-samples", type=int, default=20, help="single calls timed for the latency percentiles")


def run_audit_command(args, read_rows) -> int:
    """``grpo verify --audit``: 0 when the verifier passes the thresholds, 1 when it does not."""
    from grpo.build import build_task
    from grpo.config import json_object_arg
    from grpo.rewards import RewardRunner

    for flag in ("max_fn_rate", "max_fp_rate", "max_error_rate"):
        if not 0 <= getattr(args, flag) <= 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a rate in [0, 1], got {getattr(args, flag)}")
    if args.limit < 0:
        raise UserError(f"--limit must be >= 0, got {args.limit}")
    if bool(args.task) == bool(args.input):
        raise UserError("grpo verify --audit needs exactly one of --task NAME or --input FILE.jsonl (rows)")
    if args.task:
        task = build_task(args.task, json_object_arg(args.task_args, "--task-args"))
        rows, source = task.rows(args.split), f"task {args.task} ({args.split})"
    else:
        rows, source = read_rows(args.input), args.input
    rows = [{k: v for k, v in r.items() if k not in ("verifiers", "completion")} for r in rows]
    if args.limit:
        rows = rows[:args.limit]
    if not rows:
        raise UserError(f"{source}: no rows to audit")
    name = args.verifier
    # watch=False: the audit scores one case per call, and failing cases are what it reports, not a reason to stop
    with RewardRunner({name: json_object_arg(args.args, "--args")}, workers=args.workers, watch=False) as runner:
        report = audit(name, rows, runner, probe_attacks=args.probe_attacks, latency_samples=args.latency_samples)
    report["source"] = source
    report["thresholds"] = {"max_fn_rate": args.max_fn_rate, "max_fp_rate": args.max_fp_rate,
                            "max_error_rate": args.max_error_rate}
    report["failed"] = failures(report, args.max_fn_rate, args.max_fp_rate, args.max_error_rate)
    json_path, md_path = write_report(report, args.out)
    print(markdown(report), end="")
    print(f"wrote {json_path} and {md_path}")
    return 1 if report["failed"] else 0
