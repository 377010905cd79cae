"""Reliability: checkpoints load no code, runs own their directory, resume checks the config."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from grpo import checkpoint
from grpo.cli import main
from grpo.errors import UserError
from conftest import tiny_run_config


def _args(model_dir, plugin, run_dir, **kw):
    home = next(p for p in run_dir.parents if p.is_dir())
    empty = home / "empty.yaml"
    empty.write_text("# all settings come from overrides\n")
    return ["train", "--no-progress", str(empty), *tiny_run_config(model_dir, run_dir, plugin, **kw)]


FAST = {"steps": 1, "eval.at_start": False, "eval.at_end": False}


# ------------------------------------------------------------ checkpoint format
def test_state_round_trips_through_json_and_safetensors():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.99))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": checkpoint.rng_state(), "gen": torch.Generator().get_state()}
    data, tensors = checkpoint.encode_state(state)
    json.dumps(data)  # plain data only
    back = checkpoint.decode_state(json.loads(json.dumps(data)), tensors)
    assert back["step"] == 7
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert set(back["optimizer"]["state"]) == {0, 1}  # integer keys survive
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # the restored RNG states continue the same streams
    checkpoint.set_rng_state(back["rng"])
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    checkpoint.set_rng_state(state["rng"])
    assert a == (random.random(), float(np.random.rand()), float(torch.rand(1)))


def test_cuda_rng_states_restore_on_a_machine_with_fewer_gpus(monkeypatch):
    """A checkpoint saved where 2 GPUs were visible resumes where 1 is: that one's state is set
    (set_rng_state_all would have failed on an index)."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append((device, s)))
    saved = {**checkpoint.rng_state(), "cuda": [torch.full((4,), 1, dtype=torch.uint8), torch.full((4,), 2, dtype=torch.uint8)]}
    checkpoint.set_rng_state(saved)
    assert [(d, int(s[0])) for d, s in restored] == [(0, 1)]


def test_decode_rejects_unknown_markers_and_missing_tensors():
    with pytest.raises(ValueError, match="unknown marker"):
        checkpoint.decode_state({"__reduce__": ["os.system", "true"]}, {})
    with pytest.raises(ValueError, match="missing"):
        checkpoint.decode_state({"__tensor__": "t9"}, {})


class _Planted:
    def __reduce__(self):
        return (open, (os.environ["PLANTED_MARKER"], "w"))


def test_resume_never_unpickles_a_planted_state_file(tiny_model_dir, toy_plugin, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    assert main(_args(tiny_model_dir, toy_plugin, run_dir, **FAST)) == 0
    ckpt = checkpoint.latest(run_dir)
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("PLANTED_MARKER", str(marker))
    (ckpt / "state.json").unlink()
    (ckpt / "state.pt").write_bytes(pickle.dumps({"step": 1, "x": _Planted()}))
    assert main([*_args(tiny_model_dir, toy_plugin, run_dir, **FAST), "--resume"]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "error: " in err and "pickle" in err and "Traceback" not in err


def test_tampered_checkpoint_is_a_one_line_error(tiny_model_dir, toy_plugin, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_args(tiny_model_dir, toy_plugin, run_dir, **FAST)) == 0
    weights = checkpoint.latest(run_dir) / "state.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    assert main([*_args(tiny_model_dir, toy_plugin, run_dir, **FAST), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no intact checkpoint") and "SHA-256" in err[-1]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tiny_model_dir, toy_plugin, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_args(tiny_model_dir, toy_plugin, run_dir, **{**FAST, "steps": 2})) == 0
    newest = checkpoint.latest(run_dir)
    assert newest.name == "step-000002"
    (newest / "state.json").write_text("{truncated")
    capsys.readouterr()
    assert main([*_args(tiny_model_dir, toy_plugin, run_dir, **{**FAST, "steps": 2}), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "step-000002 is corrupt" in err and "using the previous checkpoint step-000001" in err
    assert "resumed from" in err and "(step 1)" in err

    # a state.json that parses but lost a part (its hashes cover the tensor files only): KeyError before
    record = json.loads((checkpoint.latest(run_dir) / "state.json").read_text())
    del record["state"]["optimizer"]
    (checkpoint.latest(run_dir) / "state.json").write_text(json.dumps(record))
    assert main([*_args(tiny_model_dir, toy_plugin, run_dir, **{**FAST, "steps": 3}), "--resume"]) == 0
    assert "its state has no optimizer" in capsys.readouterr().err


# ------------------------------------------------------------------ run directory
def test_leftover_partial_checkpoint_is_removed_on_start(tiny_model_dir, toy_plugin, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_args(tiny_model_dir, toy_plugin, run_dir, **FAST)) == 0
    partial = run_dir / "checkpoints" / ".tmp-killed"
    (partial / "adapter").mkdir(parents=True)
    (partial / "state.safetensors").write_bytes(b"half")
    assert main([*_args(tiny_model_dir, toy_plugin, run_dir, **{**FAST, "steps": 2}), "--resume"]) == 0
    assert not partial.exists()
    assert "half-written" in capsys.readouterr().err


def test_foreign_non_empty_directory_is_refused(tiny_model_dir, toy_plugin, tmp_path, capsys):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("my: own\n")
    (run_dir / "summary.json").write_text('{"mine": 1}')
    assert main(_args(tiny_model_dir, toy_plugin, run_dir, **FAST)) == 2
    assert "not a grpo run directory" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == "my: own\n"
    assert (run_dir / "summary.json").read_text() == '{"mine": 1}'


def test_output_path_that_is_a_file_is_a_one_line_error(tiny_model_dir, toy_plugin, tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert main(_args(tiny_model_dir, toy_plugin, path, **FAST)) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(_args(tiny_model_dir, toy_plugin, path / "sub", **FAST)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_resume_on_empty_directory_fails_before_loading_anything(tiny_model_dir, toy_plugin, tmp_path, monkeypatch,
                                                                  capsys):
    import grpo.build

    def no_model(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(grpo.build, "build_policy", no_model)
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    assert main([*_args(tiny_model_dir, toy_plugin, run_dir, **FAST), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert list(run_dir.iterdir()) == []


def test_second_run_in_the_same_directory_is_refused_while_the_first_holds_it(tmp_path):
    from grpo import rundir
    from grpo.errors import UserError

    run_dir = tmp_path / "run"
    lock = rundir.claim(run_dir, resume=False)
    with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()}\)"):
        rundir.claim(run_dir, resume=False)
    lock.release()
    rundir.claim(run_dir, resume=False).release()  # released: free again


def test_lock_of_a_killed_process_is_not_stale(tmp_path):
    import subprocess
    import sys

    from grpo import rundir

    run_dir = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from grpo import rundir; "
            "rundir.claim(Path(sys.argv[1]), resume=False); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        from grpo.errors import UserError

        with pytest.raises(UserError, match="in use"):
            rundir.claim(run_dir, resume=False)
        proc.kill()
        proc.wait()
        rundir.claim(run_dir, resume=False).release()  # the kernel dropped the dead holder's lock
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------- resume vs config
def test_resume_refuses_fixed_keys_and_keeps_config_yaml(tiny_model_dir, toy_plugin, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_args(tiny_model_dir, toy_plugin, run_dir, **FAST)) == 0
    before = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    args = _args(tiny_model_dir, toy_plugin, run_dir, **{**FAST, "steps": 2, "model.lora_rank": 8, "seed": 3,
                                                         "loss.update_passes": 2})
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "model.lora_rank: 4 -> 8" in err and "seed: 0 -> 3" in err and "Traceback" not in err
    assert "loss.update_passes: 1 -> 2" in err  # the schedule counts optimizer steps (steps x update_passes)
    assert (run_dir / "config.yaml").read_text() == before


def test_resume_applies_a_changed_lr(tiny_model_dir, toy_plugin, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_args(tiny_model_dir, toy_plugin, run_dir, **FAST)) == 0
    capsys.readouterr()
    args = _args(tiny_model_dir, toy_plugin, run_dir, **{**FAST, "steps": 2, "optim.lr": 0.003})
    assert main([*args, "--resume"]) == 0
    assert "resume: optim.lr changed 0.05 -> 0.003" in capsys.readouterr().err
    lrs = [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [0.05, 0.003]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.003
    state = checkpoint.read_state(checkpoint.latest(run_dir))
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.003


def test_logged_lr_is_the_one_each_step_used(tiny_model_dir, toy_plugin, tmp_path):
    """The scheduler steps after the optimizer: reading it then logged the next step's lr
    (a linear schedule's last step showed 0)."""
    run_dir = tmp_path / "run"
    args = _args(tiny_model_dir, toy_plugin, run_dir, **{**FAST, "steps": 2, "optim.schedule": "linear",
                                                          "optim.warmup_steps": 0, "optim.lr": 0.04})
    assert main(args) == 0
    lrs = [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.04, 0.02])


def test_engine_logprob_diff_compares_the_policy_that_sampled(tiny_model_dir, toy_plugin, tmp_path):
    """With two update passes the diff was taken in the last pass, after an optimizer step: it
    measured the policy's own move (0.08 here), not the engine against the trainer."""
    run_dir = tmp_path / "run"
    args = _args(tiny_model_dir, toy_plugin, run_dir, **{**FAST, "steps": 2, "loss.update_passes": 2,
                                                          "optim.lr": 0.05})
    assert main(args) == 0
    diffs = [json.loads(line)["engine_logprob_diff"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(diffs) < 1e-3, diffs


def test_config_changes_lists_added_task_args_as_changes():
    from grpo.resume import config_changes

    saved = {"task": {"name": "arith", "args": {}}, "optim": {"lr": 0.1}}
    current = {"task": {"name": "arith", "args": {"digits": 3}}, "optim": {"lr": 0.1}}
    assert config_changes(saved, current) == {"task.args": ({}, "(unset)"), "task.args.digits": ("(unset)", 3)}


# -------------------------------------------------------------------- verifiers
@pytest.mark.parametrize("override, key", [("task.verifier_weights={maht: 0.5}", "task.verifier_weights"),
                                           ("task.verifier_args={mth: {tolerance: 0.1}}", "task.verifier_args")])
def test_unknown_verifier_names_in_settings_are_errors(override, key):
    from grpo.build import build_task_rows
    from grpo.config import load_config
    from grpo.errors import UserError
    from grpo.rewards import RewardRunner

    cfg = load_config(None, [override])
    with RewardRunner(cfg.task.verifier_args, cfg.task.verifier_weights, workers=1) as runner:
        with pytest.raises(UserError, match=rf"{key} names verifier '\w+', which no row of the task uses. "
                                            r"Did you mean 'math'\? The rows use: math"):
            build_task_rows(cfg, runner)


REWARD_PLUGIN = '''
from grpo.registry import VERIFIERS
from verifiers.base import Score, Verifier


class _Fixed(Verifier):
    fields = ()
    value = 0.0

    def score(self, completions):
        return [Score(float(c), "as written") for c in completions]


@VERIFIERS.register("as_number_process")
class AsNumberProcess(_Fixed):
    isolation = "process"


@VERIFIERS.register("as_number_inline")
class AsNumberInline(_Fixed):
    isolation = "inline"


@VERIFIERS.register("two_for_one")
class TwoForOne(Verifier):
    fields = ()

    def score(self, completions):
        return [Score(1.0, "one"), Score(1.0, "extra")]


class _TwoArgError(Exception):
    def __init__(self, code, detail):  # cannot be rebuilt from its args when unpickled
        super().__init__(f"{code}: {detail}")


@VERIFIERS.register("hostile_exits")
class HostileExits(Verifier):
    """sys.exit, or an exception that does not unpickle, by what the completion says."""
    fields = ()

    def score(self, completions):
        if completions[0] == "exit":
            import sys
            sys.exit(3)
        if completions[0] == "unpicklable":
            raise _TwoArgError(7, "detail")
        return [Score(1.0, "fine")]


@VERIFIERS.register("always_raises")
class AlwaysRaises(Verifier):
    fields = ()
    isolation = "inline"

    def score(self, completions):
        raise RuntimeError("broken checker")
'''


@pytest.fixture(scope="module")
def reward_plugin(tmp_path_factory):
    from grpo.build import load_plugins

    path = tmp_path_factory.mktemp("rewards") / "reward_plugin.py"
    path.write_text(REWARD_PLUGIN)
    load_plugins([str(path)])
    return path


def _score(name, completions, runner=None):
    from grpo.rewards import RewardRunner

    rows = [{"verifiers": {name: 1.0}}] * len(completions)
    own = runner is None
    runner = runner or RewardRunner(workers=1)
    try:
        return runner.score(rows, completions)
    finally:
        if own:
            runner.close()


@pytest.mark.parametrize("name", ["as_number_process", "as_number_inline"])
def test_out_of_range_and_non_finite_rewards_are_rejected_and_counted(reward_plugin, name):
    batch = _score(name, ["0.5", "1e39", "nan", "-inf", "-3"])
    assert batch.per_verifier[name] == [0.5, 0.0, 0.0, 0.0, -3.0]
    assert batch.errors[name] == 3  # 1e39 (inf in float32), nan, -inf: rejected AND counted
    assert all(batch.reasons[name][i].startswith("error: rejected reward") for i in (1, 2, 3))
    assert all(math.isfinite(t) for t in batch.total)


def test_extra_rewards_from_a_process_verifier_are_an_error(reward_plugin):
    batch = _score("two_for_one", ["a", "b"])
    assert batch.errors["two_for_one"] == 2
    assert "returned 2 scores for 1 completion" in batch.reasons["two_for_one"][0]


def test_a_verifier_that_exits_or_raises_the_unpicklable_costs_its_reward_only(reward_plugin):
    """pebble would re-raise a worker's SystemExit in the trainer (the run ended with the verifier's
    status), and an exception that fails to unpickle broke the pool for every later call."""
    batch = _score("hostile_exits", ["exit", "unpicklable", "ok", "ok"])
    assert batch.per_verifier["hostile_exits"] == [0.0, 0.0, 1.0, 1.0]
    assert batch.reasons["hostile_exits"][:2] == ["error: SystemExit: 3", "error: _TwoArgError: 7: detail"]


def _children(pid):
    try:
        return [int(x) for x in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def test_a_worker_killed_from_outside_costs_nothing(reward_plugin):
    """The OOM killer or an admin killing a pool worker's namespace child left pebble's pool broken:
    every call of the next batch failed, then the run crashed with a traceback."""
    import signal
    import time

    from grpo.rewards import RewardRunner

    with RewardRunner(workers=1) as runner:
        assert _score("as_number_process", ["0.5"], runner).per_verifier["as_number_process"] == [0.5]
        workers = runner._pool._pool._pool_manager.worker_manager.workers  # pebble's {pid: process}
        inner = [c for worker in workers for c in _children(worker)]
        assert inner, "no pool worker found"
        for pid in inner:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        for _ in range(2):  # the batch after the kill, and the next one
            batch = _score("as_number_process", ["0.25", "2"], runner)
            assert batch.per_verifier["as_number_process"] == [0.25, 2.0], batch.reasons


def test_a_failing_verifier_is_not_hidden_by_one_at_weight_zero(reward_plugin):
    """configs/rm/grpo_arith.yaml's shape: the learned reward weighs in, a rule check at 0 only measures."""
    from grpo.rewards import FAILED_BATCHES_LIMIT, RewardRunner

    rows = [{"verifiers": {"always_raises": 1.0, "as_number_inline": 0.0}}] * 2
    with RewardRunner(workers=1) as runner:
        for _ in range(FAILED_BATCHES_LIMIT - 1):
            runner.score(rows, ["1", "0"])
        with pytest.raises(UserError, match="every verifier call failed in 3 consecutive batches"):
            runner.score(rows, ["1", "0"])


def test_an_unwatched_runner_counts_only_the_batches_it_is_shown(reward_plugin):
    """The trainer scores its share unwatched and watches what all ranks gathered (every rank alike)."""
    from grpo.rewards import FAILED_BATCHES_LIMIT, RewardRunner

    rows = [{"verifiers": {"always_raises": 1.0}}] * 2
    with RewardRunner(workers=1, watch=False) as runner:
        for _ in range(FAILED_BATCHES_LIMIT + 1):
            batch = runner.score(rows, ["1", "0"])  # evaluations, or one rank's share: not counted
        for _ in range(FAILED_BATCHES_LIMIT - 1):
            runner.watch_failures(batch)
        with pytest.raises(UserError, match="every verifier call failed in 3 consecutive batches"):
            runner.watch_failures(batch)


@pytest.mark.parametrize("weight", ["x", float("nan"), True, None])
def test_a_verifier_weight_must_be_a_finite_number(reward_plugin, weight):
    from grpo.rewards import RewardRunner

    with RewardRunner(workers=1) as runner, pytest.raises(UserError, match="row 0 weighs verifier 'as_number_inline' "
                                                                           "by .*; a weight is a finite number"):
        runner.check_rows([{"verifiers": {"as_number_inline": weight}}], "rows")


def test_every_call_failing_warns_each_batch_and_stops_after_three(reward_plugin, capsys):
    from grpo.errors import UserError
    from grpo.rewards import FAILED_BATCHES_LIMIT, RewardRunner

    with RewardRunner(workers=1) as runner:
        for _ in range(FAILED_BATCHES_LIMIT - 1):
            _score("always_raises", ["a", "b"], runner)
        assert "verifier 'always_raises': all 2 calls failed in this batch" in capsys.readouterr().err
        _score("as_number_inline", ["1"], runner)  # a batch with signal resets the count
        for _ in range(FAILED_BATCHES_LIMIT - 1):
            _score("always_raises", ["a"], runner)
        with pytest.raises(UserError, match="every verifier call failed in 3 consecutive batches"):
            _score("always_raises", ["a"], runner)


# -------------------------------------------------------- bad files -> error lines
def test_non_utf8_dataset_is_a_one_line_error(tmp_path):
    from grpo.errors import UserError
    from tasks.loaders import read_records

    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"q": "ok"}\n{"q": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9"):
        read_records(path)


def test_non_utf8_verify_input_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_bytes('{"completion": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    assert main(["verify", "--verifier", "math", "--input", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not UTF-8" in err and len(err.splitlines()) == 1


def test_truncated_adapter_in_eval_is_a_one_line_error(tiny_model_dir, toy_plugin, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_args(tiny_model_dir, toy_plugin, run_dir, **FAST)) == 0
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    code = main(["eval", "--task", "toy_digits", "--model", str(tiny_model_dir), "--plugins", str(toy_plugin),
                 "--adapter", str(run_dir), "--n", "1", "--k", "1", "--limit", "1", "--max-new-tokens", "2",
                 "--device", "cpu", "--workers", "1", "--out", str(tmp_path / "eval")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --adapter") and "corrupt or truncated" in err[-1]


def test_disk_full_mid_run_says_so(tiny_model_dir, toy_plugin, tmp_path, monkeypatch, capsys):
    import errno

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "checkpoints"))

    monkeypatch.setattr(checkpoint, "save", full)
    assert main(_args(tiny_model_dir, toy_plugin, tmp_path / "run", **FAST)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: run ") and "No space left on device" in err and "the disk is full" in err


def test_disk_full_inside_safetensors_is_the_same_one_line_error(tiny_model_dir, toy_plugin, tmp_path, monkeypatch,
                                                                 capsys):
    """safetensors reports a full disk as SafetensorError '... (os error 28)', not OSError."""
    import peft  # noqa: F401  (imported first: peft and transformers bind save_file at import, keep theirs)
    import safetensors.torch
    import transformers.modeling_utils  # noqa: F401
    from safetensors import SafetensorError

    def full(*a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(_args(tiny_model_dir, toy_plugin, tmp_path / "run", **FAST)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: run ") and "No space left on device" in err


def test_a_close_that_fails_after_the_run_failed_leaves_the_runs_error(tiny_model_dir, toy_plugin, tmp_path,
                                                                       monkeypatch, capsys):
    import errno

    from grpo.metrics import MetricsLogger

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "checkpoints"))

    def close(self, failed=False):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "events.out.tfevents")

    monkeypatch.setattr(checkpoint, "save", full)
    monkeypatch.setattr(MetricsLogger, "close", close)
    assert main(_args(tiny_model_dir, toy_plugin, tmp_path / "run", **FAST)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: run ") and "Traceback" not in "\n".join(err)
    assert any(line.startswith("warning: closing the run's metrics failed too: OSError") for line in err)


def test_resume_drops_a_metrics_line_cut_short(tiny_model_dir, toy_plugin, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_args(tiny_model_dir, toy_plugin, run_dir, **FAST)) == 0
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "reward/me')  # a write the disk filled up in the middle of
    capsys.readouterr()
    assert main([*_args(tiny_model_dir, toy_plugin, run_dir, **{**FAST, "steps": 2}), "--resume"]) == 0
    assert "metrics.jsonl line 2 is not a whole record (a write cut short?); dropped" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resuming_a_finished_run_neither_evaluates_nor_saves_again(tiny_model_dir, toy_plugin, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = _args(tiny_model_dir, toy_plugin, run_dir, **{**FAST, "eval.at_end": True})
    assert main(args) == 0
    final = checkpoint.latest(run_dir)
    written = (final / "state.json").stat().st_mtime_ns
    before = (run_dir / "metrics.jsonl").read_text()
    assert main([*args, "--resume"]) == 0
    assert (run_dir / "metrics.jsonl").read_text() == before  # the step-1 evaluation once
    assert checkpoint.latest(run_dir) == final and (final / "state.json").stat().st_mtime_ns == written
    assert "heldout/accuracy" in json.loads((run_dir / "summary.json").read_text())["after"]


def test_a_numbered_optimizer_state_loads_keyed_by_name():
    """A checkpoint from one process or DDP (parameters numbered) resumed under FSDP2 (keyed by name)."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from grpo.parallel import keyed_by_name

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        model[0].weight.requires_grad_(False)  # a frozen base weight, as under LoRA
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)

    a, opt_a = make()
    a(torch.ones(2, 3)).sum().backward()
    opt_a.step()
    b, opt_b = make()
    keyed = keyed_by_name(b, opt_b, opt_a.state_dict())
    assert sorted(keyed["state"]) == ["0.bias", "1.bias", "1.weight"]
    set_optimizer_state_dict(b, opt_b, keyed, options=StateDictOptions(full_state_dict=True))
    for pa, pb in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
        assert torch.equal(opt_a.state[pa]["exp_avg"], opt_b.state[pb]["exp_avg"])
    assert keyed_by_name(b, opt_b, keyed) is keyed  # already by name: unchanged


# ------------------------------------------------------------ verifier isolation
ATTACK = '''
import json, os, signal, sys, time
from grpo.build import load_plugins
from grpo.rewards import RewardRunner

plugin = sys.argv[1]
load_plugins([plugin])
trainer = os.getpid()
os.environ["TRAINER_PID"] = str(trainer)
with RewardRunner(workers=1) as runner:
    batch = runner.score([{"verifiers": {"attacker": 1.0}}] * 3, ["getppid", "trainer", "proc"])
    print(json.dumps({"reasons": batch.reasons["attacker"], "errors": batch.errors["attacker"]}), flush=True)
print("trainer survived", flush=True)
'''

ATTACKER = '''
import os
from grpo.registry import VERIFIERS
from verifiers.base import Score, Verifier


@VERIFIERS.register("attacker")
class Attacker(Verifier):
    fields = ()

    def score(self, completions):
        if completions[0] == "proc":
            return [Score(0.0, f"trainer in /proc: {os.path.exists('/proc/' + os.environ['TRAINER_PID'])}")]
        target = os.getppid() if completions[0] == "getppid" else int(os.environ["TRAINER_PID"])
        try:
            os.kill(target, 9)
            os.killpg(os.getpgid(int(os.environ["TRAINER_PID"])), 9)
        except OSError as exc:
            return [Score(0.0, f"kill refused: {type(exc).__name__}")]
        return [Score(1.0, "kill sent")]
'''


def _attack(tmp_path, as_user: bool):
    import shutil
    import subprocess
    import sys

    import tempfile

    prefix = []
    if as_user:
        if os.geteuid() != 0 or not shutil.which("setpriv"):
            pytest.skip("needs root and setpriv to run the trainer as an ordinary user")
        prefix = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    home = Path(tempfile.mkdtemp(prefix="grpo-attack-"))  # readable by the ordinary user too
    try:
        home.chmod(0o755)
        plugin = home / "attacker.py"
        plugin.write_text(ATTACKER)
        plugin.chmod(0o644)
        return subprocess.run([*prefix, sys.executable, "-c", ATTACK, str(plugin)], capture_output=True, text=True,
                              timeout=120, start_new_session=True, cwd=str(home),
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("as_user", [False, True], ids=["as_this_user", "as_nobody"])
def test_process_verifier_cannot_kill_the_trainer(tmp_path, as_user):
    """issue 13 item 5: os.kill(os.getppid(), 9) from a process-mode verifier took the trainer down."""
    proc = _attack(tmp_path, as_user)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "trainer survived"
    report = json.loads(lines[0])
    # getppid() is 0 inside the worker's PID namespace (kill(0) hits only the namespace: "sent");
    # the trainer's real pid does not exist there
    assert report["reasons"][1] == "kill refused: ProcessLookupError", report
    assert report["reasons"][2] == "trainer in /proc: False", report  # a private /proc of the namespace


def test_inline_watchdog_interrupts_a_hanging_call():
    import time

    from grpo.isolation import VerifierTimeout, inline_deadline

    start = time.monotonic()
    with pytest.raises(VerifierTimeout, match="did not return within 0.2s"):
        with inline_deadline(0.2, "verifier 'slow'"):
            time.sleep(5)
    assert time.monotonic() - start < 2
    with inline_deadline(1.0, "fast"):
        pass
    time.sleep(1.1)  # the timer was cancelled: no late alarm


def test_torchrun_ranks_after_the_first_do_not_take_the_lock(tmp_path, monkeypatch):
    from grpo import rundir

    run_dir = tmp_path / "run"
    lock = rundir.claim(run_dir, resume=False)  # rank 0
    monkeypatch.setenv("RANK", "1")
    rundir.claim(run_dir, resume=False).release()  # rank 1: checks only, no "in use" error
    lock.release()


ALLOC_PLUGIN = '''
from grpo.registry import VERIFIERS
from verifiers.base import Score, Verifier


@VERIFIERS.register("allocates_mb")
class AllocatesMB(Verifier):
    """Allocates (and touches) int(completion) MB, then scores 1; memory_mb 256."""
    fields = ()
    memory_mb = 256

    def score(self, completions):
        out = []
        for c in completions:
            block = bytearray(int(c) << 20)
            block[::4096] = b"x" * len(block[::4096])
            out.append(Score(1.0, f"{len(block) >> 20} MB"))
        return out
'''


def test_a_process_verifier_gets_its_memory_mb_beyond_what_the_trainer_maps(tmp_path):
    """The workers are forked from the trainer, whose address space (a model; on a GPU, tens of
    GB of CUDA mappings) they start with: memory_mb caps what a verifier allocates beyond it. Here
    the parent reserves 4 GB of address space (no memory) first; 100 MB fits a 256 MB cap, 400 MB
    does not (one error, reward 0, the run goes on)."""
    import mmap

    from grpo.build import load_plugins
    from grpo.rewards import RewardRunner

    plugin = tmp_path / "alloc_plugin.py"
    plugin.write_text(ALLOC_PLUGIN)
    load_plugins([str(plugin)])
    reserved = mmap.mmap(-1, 4 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=getattr(mmap, "PROT_NONE", 0))
    try:
        with RewardRunner(workers=1) as runner:
            rows = [{"id": str(i), "prompt": "p", "verifiers": {"allocates_mb": 1.0}} for i in range(2)]
            batch = runner.score(rows, ["100", "400"])
    finally:
        reserved.close()
    assert batch.total == [1.0, 0.0] and batch.errors == {"allocates_mb": 1}


def test_a_verifier_with_an_unknown_isolation_is_refused_up_front():
    from grpo.registry import VERIFIERS
    from grpo.rewards import RewardRunner
    from verifiers.base import Score, Verifier

    @VERIFIERS.register("isolation_typo")
    class Typo(Verifier):
        isolation = "proces"

        def score(self, completions):
            return [Score(1.0)] * len(completions)

    with RewardRunner(workers=1) as runner, pytest.raises(UserError, match="isolation must be 'process' or 'inline', "
                                                                           "got 'proces'"):
        runner.check_rows([{"verifiers": {"isolation_typo": 1.0}}], "rows")


def test_sigterm_stops_a_run_like_ctrl_c_and_it_resumes(tiny_model_dir, toy_plugin, tmp_path):
    """docker stop / Kubernetes / SLURM send SIGTERM: it killed the run silently (no cleanup, exit
    -15) and, as a container's pid 1, was ignored until the SIGKILL."""
    import signal
    import subprocess
    import time

    run_dir = tmp_path / "run"
    args = _args(tiny_model_dir, toy_plugin, run_dir, **{**FAST, "steps": 200})
    proc = subprocess.Popen([sys.executable, "-m", "grpo", *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints").is_dir() or not list((run_dir / "checkpoints").glob("step-*")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "terminated (SIGTERM)" and "Traceback" not in err
    assert main(_args(tiny_model_dir, toy_plugin, run_dir, **{**FAST, "steps": 3}) + ["--resume"]) == 0


def test_a_closed_pipe_is_quiet(tmp_path):
    """`grpo list | head -1`: a BrokenPipeError traceback and exit 1 before."""
    import subprocess

    out = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m grpo list | head -c 10"],
                         capture_output=True, text=True, timeout=120)
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


def test_resume_refuses_a_base_model_that_changed_under_its_name(toy_plugin, tmp_path, capsys):
    """Only model.name was compared: the same directory rewritten with other weights (same shapes)
    resumed silently, the adapter going onto a model it never trained on."""
    from conftest import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", seed=0)
    run_dir = tmp_path / "run"
    assert main(_args(model_dir, toy_plugin, run_dir, **FAST)) == 0
    resume = _args(model_dir, toy_plugin, run_dir, **{**FAST, "steps": 2}) + ["--resume"]
    build_tiny_model(tmp_path / "model", seed=1)
    capsys.readouterr()
    assert main(resume) == 2
    assert "is not the one checkpoint step-000001 trained on" in capsys.readouterr().err
    build_tiny_model(tmp_path / "model", seed=0)  # the same weights again: resumes
    assert main(resume) == 0


def test_a_run_that_fails_to_start_leaves_no_directory(tiny_model_dir, toy_plugin, tmp_path, capsys):
    run_dir = tmp_path / "a" / "b" / "bad"
    assert main(_args(tiny_model_dir, toy_plugin, run_dir, **{**FAST, "task.args.nn": 4})) == 2
    assert "task.args" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # it held .grpo-run and config.yaml, and its parents
    kept = tmp_path / "mine"
    kept.mkdir()  # a directory the user made stays
    assert main(_args(tiny_model_dir, toy_plugin, kept, **{**FAST, "task.args.nn": 4})) == 2
    assert kept.is_dir()


def test_a_finished_run_without_checkpoints_is_not_overwritten(tiny_model_dir, toy_plugin, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    assert main(_args(tiny_model_dir, toy_plugin, run_dir, **FAST)) == 0
    shutil.rmtree(run_dir / "checkpoints")  # e.g. deleted to save space
    before = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(_args(tiny_model_dir, toy_plugin, run_dir, **{**FAST, "seed": 5})) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == before
