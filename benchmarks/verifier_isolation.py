"""Cost of verifier worker isolation (grpo/isolation.py): score 64 `math` completions with
2 workers, isolation on and off, 3 repetitions each.

    python benchmarks/verifier_isolation.py

Prints, per setting, the first batch (includes starting the pool) and a warm batch, in seconds.
"""

from __future__ import annotations

import time


def measure(isolated: bool, reps: int = 3) -> tuple[list[float], list[float]]:
    import grpo.isolation as isolation
    from grpo.rewards import RewardRunner

    real = isolation.isolate_worker
    if not isolated:
        isolation.isolate_worker = lambda: None
    rows = [{"verifiers": {"math": 1.0}, "answer": str(i)} for i in range(64)]
    completions = [f"The answer is \\boxed{{{i if i % 2 else i + 1}}}" for i in range(64)]
    first, warm = [], []
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            with RewardRunner(workers=2) as runner:
                batch = runner.score(rows, completions)
                t1 = time.perf_counter()
                batch = runner.score(rows, completions)
                t2 = time.perf_counter()
            assert sum(batch.correct) == 32, "the verifier must work in the workers"
            first.append(t1 - t0)
            warm.append(t2 - t1)
    finally:
        isolation.isolate_worker = real
    return first, warm


if __name__ == "__main__":
    for isolated in (False, True, False, True):
        first, warm = measure(isolated)
        print(f"isolation {'on ' if isolated else 'off'}: first batch (pool start) "
              f"{', '.join(f'{x:.3f}' for x in first)} s; warm batch {', '.join(f'{x:.3f}' for x in warm)} s")
