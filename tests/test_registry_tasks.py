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
    with pytest.raises(UserError, match="cannot import"):
        TASKS.get("no_such_module_xyz:Thing")


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
