"""Evaluation A/B: the greedy row decoded with the samples (one decode) against its own call.

    .venv/bin/python benchmarks/eval_greedy_ab.py configs/arith.yaml --reps 2

Sets up the run's trainer from the config (its output goes to a temporary directory), then
alternates its held-out evaluation (``Trainer._evaluate``: n samples per problem at T plus one
greedy completion) with the HF engine's ``samples_greedy_alongside`` on (``plus_greedy``: one
prefill and one decode) and off (a second, greedy ``generate`` call), ``--reps`` times each, the
order flipping every round. Prints each evaluation's time and headline metrics, then the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="configs/arith.yaml")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    from grpo.config import load_config
    from grpo.engines.hf import HFEngine
    from grpo.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, [f"output_dir={out}", "name=eval_greedy_ab", "rollout.engine=hf"])
        trainer = Trainer(cfg, progress=False)
        trainer.setup()
        times: dict[bool, list[float]] = {True: [], False: []}
        try:
            for rep in range(args.reps):
                for together in ((True, False) if rep % 2 == 0 else (False, True)):
                    HFEngine.samples_greedy_alongside = together
                    t = time.perf_counter()
                    m = trainer._evaluate(0)
                    times[together].append(time.perf_counter() - t)
                    print(f"greedy {'with the samples' if together else 'own call      '}: {times[together][-1]:.1f} s, "
                          f"accuracy {m['heldout/accuracy']:.4f}, greedy {m.get('heldout/greedy_accuracy', float('nan')):.4f}",
                          flush=True)
        finally:
            HFEngine.samples_greedy_alongside = True
            trainer.cleanup()
    own, together = statistics.median(times[False]), statistics.median(times[True])
    print(f"median: own call {own:.1f} s, with the samples {together:.1f} s -> {own / together:.3f}x")


if __name__ == "__main__":
    main()
