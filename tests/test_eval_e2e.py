"""`grpo eval` end to end on the tiny random model, and the trainer's held-out evaluation hooks."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, tiny_run_config
from grpo.cli import main

# A task a random character model solves sometimes (pass@k between 0 and 1, rising with k),
# with a correctness verifier and a shaping one (its mean is reported, not counted as solved).
EVAL_PLUGIN = '''
from grpo.registry import TASKS, VERIFIERS
from tasks.base import Task
from verifiers.base import Score, Verifier


@VERIFIERS.register("evaltest_has_digit")
class HasDigit(Verifier):
    """1 if the completion contains a digit."""
    fields = ("digit",)

    def score(self, completions, digit):
        return [Score(float(any(ch.isdigit() for ch in c)), "digit" if any(ch.isdigit() for ch in c) else "no digit")
                for c in completions]


@VERIFIERS.register("evaltest_brevity")
class Brevity(Verifier):
    """Shaping: 1 - length / 10."""
    correctness = False
    isolation = "inline"

    def score(self, completions):
        return [Score(max(0.0, 1 - len(c) / 10), f"{len(c)} chars") for c in completions]


@TASKS.register("evaltest_digits")
class Digits(Task):
    """Say a digit."""

    def rows(self, split):
        start = 0 if split == "train" else 100
        return [{"id": f"{split}-{i}", "prompt": [{"role": "user", "content": f"digit {start + i}"}], "digit": "x",
                 "verifiers": {"evaltest_has_digit": 1.0, "evaltest_brevity": 0.1}} for i in range(6)]
'''
KS = [1, 2, 4]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("evalplugin") / "eval_plugin.py"
    path.write_text(EVAL_PLUGIN)
    return path


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, plugin, tmp_path_factory):
    """A 2-step training run that evaluates at steps 0, 1 and 2 (pass@1,2,4 from 4 samples), sampling top-5."""
    out = tmp_path_factory.mktemp("evalrun") / "run"
    empty = out.parent / "empty.yaml"
    empty.write_text("{}\n")
    args = tiny_run_config(tiny_model_dir, out, plugin, **{
        "task.name": "evaltest_digits", "eval.num_samples": 4, "eval.k": "[1, 2, 4]", "eval.num_problems": 3,
        "eval.every_n_steps": 1, "rollout.max_new_tokens": 6, "rollout.top_k": 5})
    assert main(["train", "--no-progress", str(empty), *args]) == 0
    return out


def _results(out_dir):
    return json.loads((out_dir / "results.json").read_text())


def _check_row(row):
    values = [row["pass_at_k"][str(k)]["mean"] for k in KS]
    assert all(0.0 <= v <= 1.0 for v in values), values
    assert values == sorted(values), f"pass@k not monotone in k: {values}"
    assert all(row["pass_at_k"][str(k)]["stderr"] >= 0 for k in KS)


def test_training_logs_pass_at_k_and_writes_before_after(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "heldout/pass@4" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]  # at start, every step, at the end (not twice)
    for r in evals:
        assert 0 <= r["heldout/pass@1"] <= r["heldout/pass@2"] <= r["heldout/pass@4"] <= 1
        assert "heldout/reward/evaltest_brevity" in r and "heldout/greedy_accuracy" in r
    # No key is a path prefix of another: MLflow's file store keeps "a/b" as a file, so a later
    # "a/b/c" could not be written (every held-out evaluation crashed with "heldout/reward").
    keys = {k for r in records for k in r}
    assert not [(a, b) for a in keys for b in keys if b.startswith(a + "/")]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("heldout/pass@4")] == [0, 1, 2]

    table = json.loads((run_dir / "before_after.json").read_text())
    assert table["before"] == {k: v for k, v in evals[0].items() if k != "step"}
    assert table["after"] == {k: v for k, v in evals[2].items() if k != "step"}
    assert table["eval"]["k"] == KS and table["eval"]["steps"] == 2
    md = (run_dir / "before_after.md").read_text()
    assert "| pass@4 |" in md and "±" in md and "| change |" in md


def test_resumed_run_keeps_its_before_numbers(run_dir, tiny_model_dir, plugin, tmp_path):
    import shutil

    resumed = tmp_path / "run"
    shutil.copytree(run_dir, resumed)
    args = tiny_run_config(tiny_model_dir, resumed, plugin, **{
        "task.name": "evaltest_digits", "eval.num_samples": 4, "eval.k": "[1, 2, 4]", "eval.num_problems": 3,
        "eval.every_n_steps": 1, "rollout.max_new_tokens": 6, "steps": 3})
    assert main(["train", "--no-progress", "--resume", str(resumed / "config.yaml"), *args]) == 0
    before = json.loads((run_dir / "before_after.json").read_text())["before"]
    table = json.loads((resumed / "before_after.json").read_text())
    assert table["eval"]["steps"] == 3 and table["before"] == before  # step 0's evaluation, from metrics.jsonl


def test_eval_from_run_config_reproduces_the_runs_before_and_after(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--config", str(run_dir / "config.yaml"), "--adapter", str(run_dir), "--out", str(out)]) == 0
    for name in ("results.json", "samples.jsonl", "results.md", "pass_at_k.png"):
        assert (out / name).is_file(), name
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = _results(out)
    base, trained = results["models"]
    assert (base["label"], trained["label"]) == ("base", str(run_dir))
    for row in (base, trained):
        _check_row(row)
        assert set(row["rewards"]) == {"total", "evaltest_has_digit", "evaltest_brevity"}
        assert 0 <= row["lengths"]["mean"] <= row["lengths"]["max"] <= 6
    # Same task rows, sampling settings and seed as the trainer: the numbers are the run's own.
    ba = json.loads((run_dir / "before_after.json").read_text())
    for row, logged in ((base, ba["before"]), (trained, ba["after"])):
        for k in KS:
            assert row["metrics"][f"pass@{k}"] == pytest.approx(logged[f"heldout/pass@{k}"], abs=1e-12)
        assert row["metrics"]["greedy_accuracy"] == pytest.approx(logged["heldout/greedy_accuracy"], abs=1e-12)

    run = results["run"]
    assert run["task"] == "evaltest_digits" and run["split"] == "heldout" and run["num_problems"] == 3
    assert run["sampling"] == {"n": 4, "k": KS, "temperature": 1.0, "top_p": 1.0, "top_k": 5, "max_new_tokens": 6,
                               "seed": 777, "greedy": True}
    assert run["adapters"] == [str((run_dir / "adapter").resolve())] and run["version"] not in ("", "not installed")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 3 * (4 + 1)  # rows x problems x (n sampled + 1 greedy)
    first = samples[0]
    assert {"model", "id", "mode", "prompt", "completion", "reward", "correct", "rewards", "reasons"} <= set(first)
    assert set(first["reasons"]) == {"evaltest_has_digit", "evaltest_brevity"}
    printed = capsys.readouterr().out
    assert "| base |" in printed and f"| {run_dir} |" in printed and (out / "results.md").read_text().count("±") >= 6


def test_eval_flags_are_seeded_and_rows_side_by_side(run_dir, tiny_model_dir, plugin, tmp_path):
    def run(out, seed):
        return main(["eval", "--task", "evaltest_digits", "--model", str(tiny_model_dir), "--plugins", str(plugin),
                     "--adapter", str(run_dir / "adapter"), "--adapter", str(run_dir / "adapter"),
                     "--n", "4", "--k", "1,4", "--limit", "2", "--max-new-tokens", "5", "--batch-size", "8",
                     "--seed", str(seed), "--device", "cpu", "--workers", "1", "--out", str(out)])

    assert run(tmp_path / "a", 5) == 0 and run(tmp_path / "b", 5) == 0 and run(tmp_path / "c", 6) == 0
    a, b, c = ((tmp_path / d / "samples.jsonl").read_text() for d in "abc")
    assert a == b and a != c  # a seed fixes the samples; another seed draws others
    models = _results(tmp_path / "a")["models"]
    labels = [m["label"] for m in models]
    assert labels == ["base", str(run_dir / "adapter"), str(run_dir / "adapter") + "'"]
    assert models[1]["metrics"] == models[2]["metrics"]  # the same adapter twice: the same numbers
    assert models[0]["greedy_pass_at_1"] is None
    for row in models:
        assert list(row["pass_at_k"]) == ["1", "4"]
        _check_row(row | {"pass_at_k": {**row["pass_at_k"], "2": row["pass_at_k"]["1"]}})


@pytest.mark.parametrize("argv, message", [
    (["--n", "4", "--k", "1,8"], "pass@8 needs at least 8 samples per problem but --n is 4"),
    (["--n", "4", "--k", "1,x"], "k must be integers separated by commas"),
    (["--adapter", "/nonexistent/adapter"], "no such directory"),
    (["--adapter", "{empty}"], "is not a peft adapter directory"),
    (["--adapter", "{config_only}"], "no adapter_model.safetensors"),
    (["--no-base"], "--no-base leaves nothing to evaluate"),
    (["--temperature", "0"], "add --greedy for greedy pass@1"),
    (["--task-args", "{bad"], "--task-args is not valid JSON"),
    (["--task", "evaltest_digitz"], "evaltest_digits"),
    (["--config", "{bad_config}"], "unknown setting 'num_sample'"),
])
def test_bad_input_is_a_one_line_error(argv, message, tiny_model_dir, plugin, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "bad.yaml").write_text("task: evaltest_digits\nnum_sample: 4\n")
    paths = {"{empty}": tmp_path / "empty", "{config_only}": tmp_path / "config_only",
             "{bad_config}": tmp_path / "bad.yaml"}
    argv = [str(paths.get(a, a)) for a in argv]
    base = ["eval", "--task", "evaltest_digits", "--model", str(tiny_model_dir), "--plugins", str(plugin),
            "--out", str(tmp_path / "out")]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_training_config_drives_eval(config):
    from grpo.config import load_config
    from grpo.evaluate import EVAL_SEED_OFFSET
    from grpo.eval_settings import resolve_settings
    from grpo.cli import build_parser

    path = str(REPO / "configs" / config)
    cfg = load_config(path)
    s = resolve_settings(build_parser().parse_args(["eval", "--config", path]))
    assert (s.task, s.model, s.task_args) == (cfg.task.name, cfg.model.name, cfg.task.args)
    assert (s.n, s.k, s.seed, s.temperature) == (cfg.eval.num_samples, cfg.eval.k, cfg.seed + EVAL_SEED_OFFSET,
                                                 cfg.rollout.temperature)
    argv = ["eval", "--config", path, "--n", "16", "--k", "1,16", "--limit", "5"]
    s = resolve_settings(build_parser().parse_args(argv))
    assert (s.n, s.k, s.num_problems) == (16, [1, 16], 5)  # flags override the file


def test_default_ks_are_one_powers_of_four_and_n():
    from grpo.cli import build_parser
    from grpo.eval_settings import resolve_settings

    def ks(n):
        return resolve_settings(build_parser().parse_args(["eval", "--task", "t", "--model", "m", "--n", str(n)])).k

    assert ks(16) == [1, 4, 16] and ks(1) == [1] and ks(20) == [1, 4, 16, 20]


def test_eval_runs_attention_at_the_training_precision(tiny_model_dir, tmp_path):
    """grpo eval applies model.attention_dtype as training does (grpo/build.py): a bf16 base on
    CPU gets float32 attention under auto, the model's own under 'model'; --config carries it."""
    from grpo.attention import FLOAT32_ATTENTION
    from grpo.cli import build_parser
    from grpo.eval_settings import resolve_settings
    from grpo.evaluate_cli import _load_model

    def attention(*flags):
        argv = ["eval", "--task", "t", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "bfloat16", *flags]
        model, _, _ = _load_model(resolve_settings(build_parser().parse_args(argv)), [])
        return model.config._attn_implementation

    assert attention() == FLOAT32_ATTENTION
    assert attention("--attention-dtype", "model") != FLOAT32_ATTENTION
    cfg = tmp_path / "train.yaml"
    cfg.write_text("task: {name: arith}\nmodel: {name: smollm2-135m, attention_dtype: model}\n")
    assert resolve_settings(build_parser().parse_args(["eval", "--config", str(cfg)])).attention_dtype == "model"


def test_eval_output_and_device_are_checked_before_the_evaluation(tiny_model_dir, plugin, tmp_path, capsys):
    def run(*extra):
        return main(["eval", "--task", "evaltest_digits", "--model", str(tiny_model_dir), "--plugins", str(plugin),
                     "--n", "1", "--limit", "1", "--max-new-tokens", "2", "--workers", "1", *extra])

    taken = tmp_path / "a-file"
    taken.write_text("x")
    assert run("--device", "cpu", "--out", str(taken)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: --output {taken} is a file, not a directory"
    assert run("--device", "tpu", "--out", str(tmp_path / "o")) == 2
    assert "error: unknown device 'tpu'; use auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_verifier_failures_are_reported_and_results_json_is_strict(tiny_model_dir, plugin, tmp_path, capsys):
    flaky = tmp_path / "flaky.py"
    flaky.write_text(
        "from grpo.registry import TASKS, VERIFIERS\nfrom verifiers.base import Score, Verifier\n\n"
        "@VERIFIERS.register('evaltest_flaky')\nclass Flaky(Verifier):\n    fields = ()\n"
        "    def score(self, completions):\n"
        "        if len(completions[0]) % 2:\n            raise ValueError('odd')\n"
        "        return [Score(None, 'not applicable')]\n\n"
        "@VERIFIERS.register('evaltest_never')\nclass Never(Verifier):\n    fields = ()\n"
        "    def score(self, completions):\n        return [Score(None, 'not applicable')] * len(completions)\n\n"
        "@TASKS.register('evaltest_flaky_task')\nclass T:\n    def rows(self, split):\n"
        "        return [{'id': str(i), 'prompt': [{'role': 'user', 'content': f'digit {i}'}],\n"
        "                 'digit': 'x',\n"
        "                 'verifiers': {'evaltest_flaky': 1.0, 'evaltest_has_digit': 1.0, 'evaltest_never': 1.0}}\n"
        "                for i in range(3)]\n")
    out = tmp_path / "o"
    assert main(["eval", "--task", "evaltest_flaky_task", "--model", str(tiny_model_dir), "--plugins", str(plugin),
                 "--plugins", str(flaky), "--n", "4", "--max-new-tokens", "5", "--device", "cpu", "--workers", "1",
                 "--out", str(out)]) == 0
    text = (out / "results.json").read_text()
    assert "NaN" not in text
    (row,) = json.loads(text)["models"]
    assert row["rewards"]["evaltest_never"] is None  # a mean over no sample: null, not NaN
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    failed = sum(s["reasons"].get("evaltest_flaky", "").startswith("error") for s in samples)
    assert 0 < failed < len(samples) and row["verifier_errors"] == {"evaltest_flaky": failed}
    assert "verifier errors" in (out / "results.md").read_text()
    assert f"verifier 'evaltest_flaky' failed on {failed} of {len(samples)} samples" in capsys.readouterr().err
