"""TRL- and verl-style reward functions used unchanged as verifiers (issue 17 item 1)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from grpo.errors import UserError
from grpo.rewards import RewardRunner
from verifiers.foreign import ForeignRewardVerifier, RewardContractError, detect_kind
from conftest import REPO

# Written exactly as a TRL user would (TRL docs' examples): columns as kwargs, ** for the rest.
TRL_FILE = '''
import re

def accuracy(completions, answer, **kwargs):
    """1 when the completion's last number equals the answer column."""
    out = []
    for completion, gold in zip(completions, answer):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        nums = re.findall(r"-?\\d+", text)
        out.append(1.0 if nums and nums[-1] == str(gold) else 0.0)
    return out

def sees_prompts(prompts, completions, **kwargs):
    return [float(isinstance(p, list) and isinstance(c, list) and c[0]["role"] == "assistant")
            for p, c in zip(prompts, completions)]

def only_some(completions, **kwargs):
    return [None if "skip" in str(c) else 0.5 for c in completions]

def digit_share(completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]

def returns_string(completions, **kwargs):
    return "1.0"

def returns_nan(completions, **kwargs):
    return [float("nan")] * len(completions)

def too_few(completions, **kwargs):
    return [1.0] * (len(completions) + 1)

def crashes(completions, **kwargs):
    if "boom" in str(completions):
        raise ValueError("boom")
    return [1.0] * len(completions)

def hangs(completions, **kwargs):
    import time
    if "hang" in str(completions):
        time.sleep(60)
    return [1.0] * len(completions)
'''

# verl's documented custom_reward_function signature.
VERL_FILE = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if data_source == "dict_source":
        return {"score": float(solution_str.strip().endswith(str(ground_truth))), "pred": solution_str[-3:]}
    return 1.0 if solution_str.strip().endswith(str(ground_truth)) else 0.0

def no_score_key(data_source, solution_str, ground_truth, extra_info=None):
    return {"acc": 1.0}
'''


@pytest.fixture
def reward_files(tmp_path):
    trl = tmp_path / "trl_rewards.py"
    trl.write_text(TRL_FILE)
    verl = tmp_path / "verl_reward.py"
    verl.write_text(VERL_FILE)
    return trl, verl


def _row(prompt, **cols):
    return {"prompt": prompt, **cols}


def _score(spec, rows, completions, completion_ids=None, progress=None, **args):
    from grpo.build import load_plugins
    from grpo.registry import target_plugins

    if ".py:" not in spec or Path(spec.rpartition(":")[0]).is_file():
        load_plugins(target_plugins(spec))  # code is imported only as a plugin
    rows = [{**r, "verifiers": {spec: 1.0}} for r in rows]
    with RewardRunner({spec: args} if args else None, workers=1) as runner:
        runner.check_rows(rows, "test rows")
        return runner.score(rows, completions, completion_ids=completion_ids, progress=progress)


def test_kind_detected_from_signature(reward_files):
    def trl(completions, **kw): ...
    def verl(data_source, solution_str, ground_truth, extra_info=None): ...
    def neither(x, y): ...
    assert detect_kind(trl, "t") == "trl" and detect_kind(verl, "v") == "verl"
    with pytest.raises(UserError, match="kind: trl, verl or verifiers"):
        detect_kind(neither, "n.py:neither")


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_trl_file_function_scores_plain_and_chat_rows(reward_files, isolation):
    trl, _ = reward_files
    spec = f"{trl}:accuracy"
    rows = [_row("What is 2+2?", answer="4"), _row([{"role": "user", "content": "3+4?"}], answer="7"),
            _row("1+1?", answer="2")]
    batch = _score(spec, rows, ["it is 4", "so 7", "maybe 3"], isolation=isolation)
    assert batch.per_verifier[spec] == [1.0, 1.0, 0.0]
    assert batch.correct == [True, True, False]


def test_trl_gets_prompts_and_conversational_completions(reward_files):
    trl, _ = reward_files
    spec = f"{trl}:sees_prompts"
    batch = _score(spec, [_row([{"role": "user", "content": "hi"}]), _row("plain prompt")], ["a", "b"])
    assert batch.per_verifier[spec] == [1.0, 0.0]


def test_trl_none_means_not_applicable(reward_files):
    trl, _ = reward_files
    spec = f"{trl}:only_some"
    batch = _score(spec, [_row("p"), _row("p")], ["skip me", "keep"])
    assert batch.per_verifier[spec] == [None, 0.5]


def test_missing_column_is_an_early_error(reward_files):
    trl, _ = reward_files
    with pytest.raises(UserError, match=r"lacks field\(s\) \['answer'\]"):
        _score(f"{trl}:accuracy", [_row("p")], ["4"])


@pytest.mark.parametrize("name, message", [
    ("returns_string", r"returns_string returned str '1.0'; a TRL reward function returns a list"),
    ("too_few", r"too_few returned 2 rewards for 1 completions"),
])
@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_bad_outputs_are_errors_naming_the_function(reward_files, name, message, isolation):
    trl, _ = reward_files
    with pytest.raises(RewardContractError, match=message):
        _score(f"{trl}:{name}", [_row("p")], ["x"], isolation=isolation)


def test_a_reward_that_is_not_a_finite_number_costs_that_completion_only(reward_files, tmp_path):
    trl, _ = reward_files
    spec = f"{trl}:returns_nan"
    for isolation in ("process", "inline"):
        batch = _score(spec, [_row("p")] * 2, ["x", "y"], isolation=isolation)
        assert batch.per_verifier[spec] == [0.0, 0.0] and batch.errors[spec] == 2
        assert batch.reasons[spec][0].startswith("error: rejected reward float nan from ")
    mixed = tmp_path / "mixed.py"
    mixed.write_text("def f(completions, **kw):\n"
                     "    return [{'a': 1.0, 'b': 'high', 'c': float('inf'), 'd': None}[c] for c in completions]\n")
    batch = _score(f"{mixed}:f", [_row("p")] * 4, ["a", "b", "c", "d"])
    assert batch.per_verifier[f"{mixed}:f"] == [1.0, 0.0, 0.0, None] and batch.errors[f"{mixed}:f"] == 2


def test_crash_and_hang_cost_one_reward(reward_files):
    trl, _ = reward_files
    spec = f"{trl}:crashes"
    batch = _score(spec, [_row("p")] * 3, ["ok", "boom", "ok"])
    assert batch.per_verifier[spec] == [1.0, 0.0, 1.0] and batch.errors[spec] == 1
    assert "ValueError" in batch.reasons[spec][1]
    spec = f"{trl}:hangs"
    batch = _score(spec, [_row("p")] * 2, ["hang", "ok"], timeout_s=1.0)
    assert batch.per_verifier[spec] == [0.0, 1.0] and "timeout" in batch.reasons[spec][0]


def test_verl_compute_score_float_and_dict(reward_files):
    _, verl = reward_files
    spec = f"{verl}:compute_score"
    rows = [_row("p", answer="12"), _row("p", ground_truth="5", answer="9", data_source="dict_source"),
            _row("p", answer="3")]
    batch = _score(spec, rows, ["so 12", "it is 5", "it is 4"])
    assert batch.per_verifier[spec] == [1.0, 1.0, 0.0]
    assert "pred=s 5" in batch.reasons[spec][1]


def test_verl_dict_without_score_is_an_error(reward_files):
    _, verl = reward_files
    with pytest.raises(RewardContractError, match="no_score_key returned a dict without a 'score' key"):
        _score(f"{verl}:no_score_key", [_row("p", answer="1")], ["1"])


def test_module_path_and_unknown_kind(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text("def f(completions, **kw):\n    return [0.25] * len(completions)\n"
                                                "def g(a, b):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    batch = _score("my_rewards_mod:f", [_row("p")], ["x"])
    assert batch.per_verifier["my_rewards_mod:f"] == [0.25]
    with pytest.raises(UserError, match="neither TRL's"):
        _score("my_rewards_mod:g", [_row("p")], ["x"])
    with pytest.raises(UserError, match="kind must be auto, trl, verl or verifiers"):
        _score("my_rewards_mod:f", [_row("p")], ["x"], kind="openrlhf")


def test_missing_file_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        _score(f"{tmp_path}/nope.py:f", [_row("p")], ["x"])


def _verify(args, rows, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return subprocess.run([sys.executable, "-m", "grpo", "verify", "--input", str(path), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_grpo_verify_runs_trl_and_verl_files(reward_files, tmp_path):
    trl, verl = reward_files
    rows = [{"completion": "the answer is 4", "prompt": "2+2?", "answer": "4"},
            {"completion": "the answer is 5", "prompt": "2+2?", "answer": "4"}]
    for spec in (f"{trl}:accuracy", f"{verl}:compute_score"):
        proc = _verify(["--verifier", spec], rows, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert [json.loads(line)["reward"] for line in proc.stdout.splitlines()] == [1.0, 0.0]


def test_grpo_verify_names_a_verl_row_without_a_ground_truth(reward_files, tmp_path):
    _, verl = reward_files
    proc = _verify(["--verifier", f"{verl}:compute_score"], [{"completion": "4", "prompt": "2+2?"}], tmp_path)
    assert proc.returncode == 2 and "ground_truth, reward_model.ground_truth or answer" in proc.stderr


def test_grpo_verify_bad_output_is_one_error_line(reward_files, tmp_path):
    trl, _ = reward_files
    proc = _verify(["--verifier", f"{trl}:returns_string"], [{"completion": "x", "prompt": "p"}], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: reward function {trl}:returns_string returned str '1.0'; a TRL reward function returns "
        "a list of 1 floats or None"]


def test_two_step_run_with_trl_and_verl_files(reward_files, tiny_model_dir, toy_plugin, tmp_path):
    """The built-in arith task's rows name a TRL file function and a verl file function."""
    from grpo.cli import main
    from conftest import tiny_run_config

    trl, verl = reward_files
    run_dir = tmp_path / "run"
    cfg = tmp_path / "foreign.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        task:
          name: arith
          args:
            verifiers: {{"{trl}:digit_share": 1.0, "{verl}:compute_score": 1.0}}
          verifier_args:
            "{verl}:compute_score": {{isolation: inline}}
    """))
    overrides = [o for o in tiny_run_config(tiny_model_dir, run_dir, toy_plugin) if not o.startswith("task.name")]
    overrides.append(f"plugins=[{toy_plugin}, {trl}, {verl}]")  # the files the rows name are plugins
    assert main(["train", "--no-progress", str(cfg), *overrides]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    for spec in (f"{trl}:digit_share", f"{verl}:compute_score"):
        assert f"reward/{spec}" in train[0] and train[0][f"errors/{spec}"] == 0


def test_bad_output_stops_training_with_one_error_line(reward_files, tiny_model_dir, toy_plugin, tmp_path, capsys):
    from grpo.cli import main
    from conftest import tiny_run_config

    trl, _ = reward_files
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f'task:\n  name: arith\n  args:\n    verifiers: {{"{trl}:returns_string": 1.0}}\n')
    overrides = [o for o in tiny_run_config(tiny_model_dir, tmp_path / "run", toy_plugin, steps=1)
                 if not o.startswith("task.name")] + [f"plugins=[{toy_plugin}, {trl}]"]
    assert main(["train", "--no-progress", str(cfg), *overrides]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [f"error: reward function {trl}:returns_string returned str '1.0'; a TRL reward function returns "
                   "a list of 1 floats or None"]  # process isolation: one completion per call


# What TRL's and verl's trainers pass that the two files above do not use (written as their users write
# them: TRL's built-in rewards read completion_ids and solution, curricula read trainer_state, ...)
MORE_FILE = '''
import asyncio

import numpy as np

def length_reward(completion_ids, **kwargs):  # as trl.rewards.get_soft_overlong_punishment
    return [float(len(ids)) for ids in completion_ids]

def solution_match(completions, solution, **kwargs):  # as trl.rewards.accuracy_reward
    return [float(c.strip() == s) for c, s in zip(completions, solution)]

def as_array(completions, **kwargs):
    return np.ones(len(completions)) * 0.5

def as_tensor(completions, **kwargs):
    import torch
    return torch.full((len(completions),), 0.25)

def curriculum(completions, trainer_state, log_metric, log_extra, **kwargs):
    log_metric("progress", trainer_state.global_step / trainer_state.max_steps)
    log_extra("length", [len(c) for c in completions])
    return [trainer_state.global_step / trainer_state.max_steps] * len(completions)

async def async_trl(completions, **kwargs):
    await asyncio.sleep(0)
    return [1.0 if "yes" in c else 0.0 for c in completions]

async def async_verl(data_source, solution_str, ground_truth, extra_info=None):
    await asyncio.sleep(0)
    return float(solution_str.strip() == str(ground_truth))

def vf_exact(completion, answer, **kwargs):  # a verifiers (prime-rl) rubric function
    text = completion[-1]["content"] if isinstance(completion, list) else completion
    return 1.0 if text.strip() == answer else 0.0

async def vf_state(prompt, completion, state, info, task):
    return float(state["completion_ids"] == [7, 8] and info == {"k": 1} and task == "default"
                 and isinstance(prompt, list) and completion[0]["role"] == "assistant")

def vf_needs_parser(completion, answer, parser):
    return 0.0

def verl_method(data_source, solution_str, ground_truth, extra_info=None, method="strict"):
    return {"score": float(solution_str.strip() == str(ground_truth)), "source": data_source, "method": method}
'''


@pytest.fixture
def more_file(tmp_path):
    path = tmp_path / "more_rewards.py"
    path.write_text(MORE_FILE)
    return path


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_trl_gets_completion_ids(more_file, isolation):
    spec = f"{more_file}:length_reward"
    assert detect_kind(lambda completion_ids, **kw: None, "f") == "trl"
    batch = _score(spec, [_row("p"), _row("p")], ["ab", "c"], completion_ids=[[1, 2, 3], [4]], isolation=isolation)
    assert batch.per_verifier[spec] == [3.0, 1.0]
    with pytest.raises(RewardContractError, match="needs completion_ids, which this caller does not have"):
        _score(spec, [_row("p")], ["ab"], isolation=isolation)  # grpo verify: text only


def test_columns_map_a_functions_names_to_the_rows_columns(more_file):
    spec = f"{more_file}:solution_match"
    with pytest.raises(UserError, match=r"lacks field\(s\) \['solution'\]"):
        _score(spec, [_row("p", answer="4")], ["4"])
    batch = _score(spec, [_row("p", answer="4"), _row("p", answer="5")], ["4", "4"], columns={"solution": "answer"})
    assert batch.per_verifier[spec] == [1.0, 0.0]


@pytest.mark.parametrize("isolation", ["process", "inline"])
@pytest.mark.parametrize("name, value", [("as_array", 0.5), ("as_tensor", 0.25)])
def test_trl_array_and_tensor_results(more_file, isolation, name, value):
    spec = f"{more_file}:{name}"
    assert _score(spec, [_row("p"), _row("p")], ["a", "b"], isolation=isolation).per_verifier[spec] == [value] * 2


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_trl_trainer_state_and_loggers(more_file, isolation):
    spec = f"{more_file}:curriculum"
    batch = _score(spec, [_row("p"), _row("p")], ["ab", "abcd"], progress={"global_step": 3, "max_steps": 12},
                   isolation=isolation)
    assert batch.per_verifier[spec] == [0.25, 0.25]
    assert batch.reasons[spec] == ["length=2", "length=4"]
    assert batch.metrics()["reward_metric/progress"] == 0.25
    # outside a run (grpo verify) the state is a TrainerState at step 0 of 0 steps, not None
    outside = _score(spec, [_row("p")], ["ab"], isolation="inline")
    assert outside.reasons[spec][0].startswith("error: ZeroDivisionError")  # the function's own arithmetic


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_async_functions_are_awaited(more_file, isolation):
    trl, verl = f"{more_file}:async_trl", f"{more_file}:async_verl"
    assert _score(trl, [_row("p"), _row("p")], ["yes", "no"], isolation=isolation).per_verifier[trl] == [1.0, 0.0]
    assert _score(verl, [_row("p", answer="7")], ["7"], isolation=isolation).per_verifier[verl] == [1.0]


def test_verl_ground_truth_in_verls_layout_and_missing(more_file):
    spec = f"{more_file}:async_verl"
    rows = [_row("p", reward_model={"style": "rule", "ground_truth": "4"}, data_source="openai/gsm8k"),
            _row("p", reward_model={"style": "rule", "ground_truth": "5"})]
    assert _score(spec, rows, ["4", "4"]).per_verifier[spec] == [1.0, 0.0]
    with pytest.raises(UserError, match=r"row 0 lacks field\(s\) \['ground_truth, reward_model.ground_truth or "
                                        r"answer'\]"):
        _score(spec, [_row("p", solution="4")], ["4"])


def test_verl_reward_kwargs_and_data_source(more_file):
    spec = f"{more_file}:verl_method"
    batch = _score(spec, [_row("p", answer="4")], ["4"], reward_kwargs={"method": "flexible"}, data_source="gsm8k")
    assert batch.per_verifier[spec] == [1.0] and batch.reasons[spec] == ["source=gsm8k, method=flexible"]
    with pytest.raises(UserError, match=r"takes no argument named mode \(reward_kwargs\)"):
        _score(spec, [_row("p", answer="4")], ["4"], reward_kwargs={"mode": "x"})


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_verifiers_rubric_functions(more_file, isolation):
    exact, state = f"{more_file}:vf_exact", f"{more_file}:vf_state"
    rows = [_row("2+2?", answer="4"), _row([{"role": "user", "content": "3+4?"}], answer="7")]
    assert _score(exact, rows, ["4", "7"], isolation=isolation).per_verifier[exact] == [1.0, 1.0]
    with pytest.raises(UserError, match=r"lacks field\(s\) \['answer'\]"):
        _score(exact, [_row("p")], ["4"])
    chat = [_row([{"role": "user", "content": "q"}], info={"k": 1})] * 2
    batch = _score(state, chat, ["a", "b"], completion_ids=[[7, 8], [9]], isolation=isolation)
    assert batch.per_verifier[state] == [1.0, 0.0]
    with pytest.raises(UserError, match="needs a parser"):
        _score(f"{more_file}:vf_needs_parser", rows, ["4", "7"])
