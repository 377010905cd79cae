"""DAPO dynamic sampling with backfill: the fill loop on scripted draws, and inside the trainer."""

from __future__ import annotations

import json

import pytest

from grpo.config import load_config
from grpo.dynamic_sampling import fill_batch, sampling_metrics
from grpo.trainer import run
from conftest import tiny_run_config


def _script(*rounds):
    it = iter(rounds)
    return lambda: next(it)


def test_backfills_until_target_and_discards_extras():
    # rounds of 3 groups; "informative" = odd numbers. round 1: 1 kept, round 2: 2 kept -> target 3 reached
    filled = fill_batch(_script([0, 1, 2], [3, 4, 5], [7, 9, 11]), target=3, max_rounds=5,
                        informative=lambda g: g % 2 == 1)
    assert filled.kept == [1, 3, 5] and filled.rounds == 2 and filled.full
    assert filled.drawn == [0, 1, 2, 3, 4, 5]
    # extras from the last round are dropped: target 2 reached in round 2 with 3 informative
    filled = fill_batch(_script([0, 1, 2], [3, 5, 7]), target=2, max_rounds=5, informative=lambda g: g % 2 == 1)
    assert filled.kept == [1, 3]


def test_stops_at_the_cap_with_a_partial_batch():
    filled = fill_batch(_script([0, 2], [4, 1], [3, 5]), target=3, max_rounds=2, informative=lambda g: g % 2 == 1)
    assert filled.kept == [1] and filled.rounds == 2 and not filled.full
    m = sampling_metrics(filled, group_size=8, target=3)
    assert m == {"dynamic_sampling/rounds": 2.0, "dynamic_sampling/rollouts": 32.0,
                 "dynamic_sampling/kept_groups": 1.0, "dynamic_sampling/batch_fill": pytest.approx(1 / 3)}


def test_without_a_filter_one_round_keeps_everything():
    filled = fill_batch(_script([0, 2, 4]), target=3, max_rounds=1)
    assert filled.kept == [0, 2, 4] and filled.rounds == 1


def test_train_with_dynamic_sampling_reports_rollouts(tiny_model_dir, toy_plugin, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_run_config(tiny_model_dir, run_dir, toy_plugin, **{
        "loss.preset": "dapo", "rollout.max_sampling_rounds": 3, "loss.overlong_buffer": 4, "eval.at_start": "false"})
    run(load_config(None, args), progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "reward/mean" in r]
    assert len(train) == 2
    for r in train:
        assert 1 <= r["dynamic_sampling/rounds"] <= 3
        assert r["dynamic_sampling/rollouts"] == r["dynamic_sampling/rounds"] * 2 * 4
        # only informative groups enter the loss
        assert r["sequences_in_loss"] == r["dynamic_sampling/kept_groups"] * 4
        assert r["reward/overlong_penalty"] <= 0.0
        assert r["entropy"] > 0.0
