"""Registry behaviour and the arith task."""

import pytest

from grpo.errors import UserError
from grpo.registry import Registry, TASKS, VERIFIERS
from tasks.arith import Arith, evaluate


def test_duplicate_name_raises():
    reg = Registry("thing", "grpo.test-none")
    reg.add("a", object())
    with pytest.raises(UserError, match="duplicate thing name 'a'"):
        reg.add("a", object())


def test_same_object_twice_is_fine_and_unknown_suggests():
    reg = Registry("thing", "grpo.test-none")
    obj = object()
    reg.add("alpha", obj)
    reg.add("alpha", obj)
    with pytest.raises(UserError, match=r"unknown thing 'alpah'. Did you mean 'alpha'"):
        reg.get("alpah")


def test_module_attr_path():
    assert TASKS.get("tasks.arith:Arith") is Arith
    with pytest.raises(UserError, match="has no attribute"):
        TASKS.get("tasks.arith:Nope")
    with pytest.raises(UserError, match="module 'no_such_module_xyz' is not a plugin"):
        TASKS.get("no_such_module_xyz:Thing")


@pytest.mark.parametrize("target, message", [
    ("subprocess:run", "module 'subprocess' is not a plugin"),          # no import or call outside plugins
    ("tasks.loaders:read_records", "is the callable tasks.loaders.read_records, not a Task subclass"),
    ("tasks.base:Split", "not a Task subclass or instance"),
])
def test_task_targets_outside_plugins_or_not_tasks_are_refused(target, message):
    with pytest.raises(UserError, match=message):
        TASKS.get(target)


def test_config_cannot_run_a_shell_command_through_task_name(tmp_path, capsys):
    """issue 13 item 4: task.name "subprocess:run" with args ran a shell command from grpo train."""
    from grpo.cli import main

    marker = tmp_path / "ran"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\nplugins: [subprocess]\n"
                   f"task: {{name: 'subprocess:run', args: {{args: 'touch {marker}', shell: true}}}}\n")
    assert main(["train", str(cfg)]) == 2
    assert not marker.exists()
    assert "is the callable subprocess.run, not a Task subclass" in capsys.readouterr().err


def test_eval_config_cannot_run_a_shell_command_either(tmp_path, capsys):
    from grpo.cli import main

    marker = tmp_path / "ran"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"plugins: [subprocess]\nmodel: {{name: /nowhere}}\n"
                   f"task: {{name: 'subprocess:run', args: {{args: 'touch {marker}', shell: true}}}}\n")
    assert main(["eval", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert not marker.exists()
    assert "is the callable subprocess.run, not a Task subclass" in capsys.readouterr().err


def test_plugin_modules_and_registered_factories(tmp_path, monkeypatch):
    from grpo.registry import load_plugin

    (tmp_path / "my_tasks_mod.py").write_text(
        "from grpo.registry import TASKS\nfrom tasks.arith import Arith\n"
        "@TASKS.register('my_factory')\ndef make(**kw):\n    return Arith(**kw)\n"
        "def unregistered(**kw):\n    return Arith(**kw)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="not a plugin"):
        TASKS.get("my_tasks_mod:make")
    load_plugin("my_tasks_mod", TASKS)
    assert TASKS.get("my_tasks_mod:make") is TASKS.get("my_factory")  # registered: allowed
    with pytest.raises(UserError, match="register a factory"):
        TASKS.get("my_tasks_mod:unregistered")
    with pytest.raises(UserError, match="failed to import"):
        load_plugin("no_such_module_xyz_2", TASKS)


def test_builtins_registered_with_source():
    entries = TASKS.entries()
    assert entries["arith"].source == "built-in"
    assert entries["arith"].description
    assert "math" in VERIFIERS.entries()


def test_broken_plugin_file_is_reported(tmp_path):
    from grpo.registry import load_plugin_file

    bad = tmp_path / "bad_plugin.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UserError, match="bad_plugin.py failed to import: RuntimeError: boom"):
        load_plugin_file(bad, "test", TASKS)


def test_arith_splits_disjoint_deterministic_and_correct():
    task = Arith(digits=1, operations="+-*", heldout_fraction=0.3)
    train, held = task.rows("train"), task.rows("heldout")
    exprs = lambda rows: {r["prompt"][0]["content"] for r in rows}
    assert exprs(train).isdisjoint(exprs(held))
    assert len(train) + len(held) == 300  # 10 * 10 * 3 problems, all used when the space is small
    assert train == Arith(digits=1, operations="+-*", heldout_fraction=0.3).rows("train")
    for row in held[:50]:
        expr = row["prompt"][0]["content"].removeprefix("What is ").removesuffix("?")
        assert row["answer"] == str(eval(expr))  # test-only cross-check of our evaluator
        assert row["verifiers"] == {"math": 1.0}


def test_arith_large_space_sampled_and_disjoint():
    task = Arith(digits=3, terms=3, operations="+*", train_size=300, heldout_size=50)
    train, held = task.rows("train"), task.rows("heldout")
    assert len(train) == 300 and len(held) == 50
    assert {r["prompt"][0]["content"] for r in train}.isdisjoint({r["prompt"][0]["content"] for r in held})


def test_evaluate_precedence():
    assert evaluate("2 + 3 * 4") == 14
    assert evaluate("2 * 3 - 4 * 5") == -14
    assert evaluate("9 - 3 - 2") == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"digits": 0}, "digits must be >= 1"),
    ({"operations": "+/"}, "operations must be among"),
    ({"heldout_fraction": 1.0}, "heldout_fraction"),
    ({"template": "no placeholder"}, "{expression}"),
])
def test_arith_bad_args(kwargs, message):
    with pytest.raises(UserError, match=message.replace("{", r"\{").replace("}", r"\}")):
        Arith(**kwargs)


def test_arith_stops_when_its_split_runs_out_and_keeps_other_braces(capsys):
    """2-digit sums/differences/products with 95 % held out: ~1,200 train problems, 2,000 asked for."""
    rows = Arith(digits=2, operations="+-*", heldout_fraction=0.95).rows("train")
    assert 0 < len(rows) < 2000 and len({r["prompt"][0]["content"] for r in rows}) == len(rows)
    assert f"warning: arith: {len(rows)} distinct train problems found, not the 2000 asked for" in capsys.readouterr().err
    (row, *_) = Arith(template="Put the answer in \\boxed{}: {expression}").rows("train")
    assert row["prompt"][0]["content"].startswith("Put the answer in \\boxed{}: ")
    with pytest.raises(UserError, match="train_size and heldout_size must be >= 0"):
        Arith(train_size=-3)


def test_countdown_template_keeps_other_braces():
    from tasks.countdown import Countdown

    (row, *_) = Countdown(template="Use {numbers} to make {target}; answer in \\boxed{}.", train_size=1).rows("train")
    assert row["prompt"][0]["content"].endswith("; answer in \\boxed{}.")
