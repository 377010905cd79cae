"""`grpo verify --audit`: false negatives on gold, false positives on perturbations, probes, gate."""

from __future__ import annotations

import json

import pytest

from grpo.audit import failures, gold_formats, perturbations
from grpo.cli import main
from conftest import REPO

WEAK_PLUGIN = '''
from grpo.registry import VERIFIERS
from verifiers.base import Score, Verifier


@VERIFIERS.register("contains_number")
class ContainsNumber(Verifier):
    """Deliberately weak: 1 when the reference appears anywhere in the text."""
    fields = ("answer",)

    def score(self, completions, answer):
        return [Score(float(str(a) in c), "") for c, a in zip(completions, answer)]


@VERIFIERS.register("always_fails")
class AlwaysFails(Verifier):
    """Deliberately broken: raises on every completion (what the audit exists to catch)."""
    fields = ("answer",)

    def score(self, completions, answer):
        raise IndexError("no '####' in the text")


@VERIFIERS.register("defines_add")
class DefinesAdd(Verifier):
    """Deliberately weak code check: 1 when the program defines the entry point."""
    fields = ("tests",)

    def score(self, completions, tests):
        return [Score(float("def " in c), "") for c in completions]
'''


@pytest.fixture(scope="module")
def weak_plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("weak") / "weak_verifiers.py"
    path.write_text(WEAK_PLUGIN)
    return path


def test_perturbations_of_a_number_by_hand():
    got = dict(perturbations("15"))
    assert got == {
        "off_by_one": "The answer is $\\boxed{16}$.",
        "off_by_minus_one": "The answer is $\\boxed{14}$.",
        "sign_flipped": "The answer is $\\boxed{-15}$.",
        "extra_digit": "The answer is $\\boxed{157}$.",
        "extra_leading_digit": "The answer is $\\boxed{915}$.",
        "hedged": "The answer is 15 or 16.",
        "hedged_reversed": "The answer is 16 or 15.",
        "two_boxes": "It is either $\\boxed{15}$ or $\\boxed{16}$.",
        "two_boxes_reversed": "It is either $\\boxed{16}$ or $\\boxed{15}$.",
        "empty": "",
    }
    assert dict(perturbations("-2"))["sign_flipped"] == "The answer is $\\boxed{2}$."
    assert dict(perturbations("-2"))["extra_leading_digit"] == "The answer is $\\boxed{-92}$."
    assert dict(perturbations("2.5"))["off_by_one"] == "The answer is $\\boxed{3.5}$."
    assert "sign_flipped" not in dict(perturbations("0"))  # -0 == 0 is not a wrong answer


def test_perturbations_of_latex_and_text():
    got = dict(perturbations("\\frac{5}{6}"))
    assert got["off_by_one"] == "The answer is $\\boxed{\\frac{5}{6} + 1}$."
    assert got["sign_flipped"] == "The answer is $\\boxed{-(\\frac{5}{6})}$."
    assert "extra_digit" not in got
    assert set(perturbations("Tuesday")) == {("hedged", "The answer is Tuesday or something else."), ("empty", "")}


def test_gold_formats_all_contain_the_answer():
    formats = gold_formats("42")
    assert len(formats) == 5 and all("42" in text for _, text in formats)


def _audit(tmp_path, capsys, *args):
    out = tmp_path / "audit"
    code = main(["verify", "--audit", "--out", str(out), "--latency-samples", "3", *args])
    captured = capsys.readouterr()
    return code, json.loads((out / "audit.json").read_text()), (out / "audit.md").read_text(), captured


@pytest.mark.parametrize("task, path", [("math", "math_sample.jsonl"), ("gsm8k", "gsm8k_sample.jsonl")])
def test_math_verifier_passes_its_audit_on_builtin_tasks(tmp_path, capsys, task, path):
    args = json.dumps({"path": str(REPO / "tests" / "data" / path), "heldout_fraction": 0})
    code, report, md, _ = _audit(tmp_path, capsys, "--verifier", "math", "--task", task, "--task-args", args)
    assert code == 0
    assert report["gold"]["n"] == 5 * report["rows"] and report["gold"]["false_negatives"] == 0
    assert report["perturbed"]["n"] >= 9 * report["rows"] and report["perturbed"]["false_positives"] == 0
    assert report["errors"]["n"] == 0 and report["failed"] == []
    assert report["latency_ms"]["n"] == 3 and report["throughput_per_s"] > 0
    assert "Gate: passed." in md


def test_weak_verifier_false_positives_are_reported_and_fail_the_gate(tmp_path, capsys, weak_plugin):
    plugin = weak_plugin
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"answer": "15"}) + "\n" + json.dumps({"answer": "-3"}) + "\n")
    code, report, md, captured = _audit(tmp_path, capsys, "--verifier", "contains_number", "--input", str(data),
                                        "--plugins", str(plugin))
    assert code == 1
    kinds = report["perturbed"]["by_kind"]
    # "15" appears in 157, 915, "15 or 16" and the two boxes; "-15" contains "15" too. Off by one does not.
    assert kinds["extra_digit"]["false_positives"] == 2 and kinds["hedged"]["false_positives"] == 2
    assert kinds["two_boxes"]["false_positives"] == 2 and kinds["off_by_one"]["false_positives"] == 0
    assert kinds["sign_flipped"]["false_positives"] == 1  # 15 -> -15 contains 15; -3 -> 3 does not contain -3
    assert report["gold"]["false_negatives"] == 0
    assert report["failed"][0].startswith("false-positive rate on perturbed answers")
    assert "## Gate: FAILED" in md and "False positives" in md
    # a loose enough threshold lets it through
    code, report, _, _ = _audit(tmp_path, capsys, "--verifier", "contains_number", "--input", str(data),
                                "--plugins", str(plugin), "--max-fp-rate", "0.6")
    assert code == 0 and report["perturbed"]["rate"] <= 0.6


def test_code_audit_lists_probes_that_fool_a_weak_verifier(tmp_path, capsys, weak_plugin):
    plugin = weak_plugin
    data = REPO / "tests" / "data" / "code_sample.jsonl"
    code, report, md, _ = _audit(tmp_path, capsys, "--verifier", "defines_add", "--input", str(data),
                                 "--plugins", str(plugin), "--limit", "2")
    assert code == 1
    hits = {h["probe"] for h in report["probes"]["scored_above_zero"]}
    assert {"always_equal", "print_passed", "patch_builtins"} <= hits
    assert "kill_everything" not in hits and not report["probes"]["attacks_included"]
    assert "reward-hacking probe(s) scored above 0" in report["failed"][-1]


def test_python_tests_passes_the_code_audit(tmp_path, capsys):
    data = REPO / "tests" / "data" / "code_sample.jsonl"
    code, report, _, _ = _audit(tmp_path, capsys, "--verifier", "python_tests", "--input", str(data), "--limit", "3")
    assert code == 0, report["failed"]
    assert report["gold"]["n"] == 3 and report["gold"]["false_negatives"] == 0
    assert report["probes"]["n"] == 15 and report["probes"]["scored_above_zero"] == []


def test_failures_thresholds_by_hand():
    report = {"gold": {"rate": 0.1}, "perturbed": {"rate": 0.0}, "errors": {"rate": 0.02},
              "probes": {"scored_above_zero": []}}
    assert failures(report, 0.1, 0.0, 0.05) == []
    assert failures(report, 0.05, 0.0, 0.01) == ["false-negative rate on gold answers 0.100 > 0.05",
                                                 "error rate (crashes and timeouts) 0.020 > 0.01"]


def test_audit_needs_rows_from_exactly_one_place(tmp_path, capsys):
    assert main(["verify", "--audit", "--verifier", "math"]) == 2
    assert "exactly one of --task NAME or --input" in capsys.readouterr().err
    assert main(["verify", "--audit", "--verifier", "math", "--task", "arith", "--max-fp-rate", "2"]) == 2
    assert "--max-fp-rate must be a rate in [0, 1]" in capsys.readouterr().err


LAST_NUMBER_PLUGIN = '''
import re
from grpo.registry import VERIFIERS
from verifiers.base import Score, Verifier


@VERIFIERS.register("last_number")
class LastNumber(Verifier):
    """A common shortcut: the last number in the text is the answer."""
    fields = ("answer",)

    def score(self, completions, answer):
        out = []
        for c, a in zip(completions, answer):
            nums = re.findall(r"-?\\d+", c)
            out.append(Score(float(bool(nums) and nums[-1] == str(a)), ""))
        return out
'''


def test_last_number_checker_is_caught_by_the_reversed_hedges(tmp_path_factory, tmp_path, capsys):
    plugin = tmp_path_factory.mktemp("last") / "last_number.py"
    plugin.write_text(LAST_NUMBER_PLUGIN)
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"answer": "15"}) + "\n")
    code, report, _, _ = _audit(tmp_path, capsys, "--verifier", "last_number", "--input", str(data),
                                "--plugins", str(plugin))
    kinds = report["perturbed"]["by_kind"]
    assert code == 1 and report["gold"]["false_negatives"] == 0
    assert kinds["hedged_reversed"]["false_positives"] == 1 and kinds["two_boxes_reversed"]["false_positives"] == 1
    assert kinds["hedged"]["false_positives"] == 0 and kinds["two_boxes"]["false_positives"] == 0


def test_a_verifier_that_always_fails_gets_its_report(tmp_path, capsys, weak_plugin):
    """Each latency call is one scoring batch: a failing verifier stopped the audit (exit 2, no report)."""
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"answer": "15"}) + "\n")
    code, report, md, _ = _audit(tmp_path, capsys, "--verifier", "always_fails", "--input", str(data),
                                 "--plugins", str(weak_plugin))
    assert code == 1 and report["errors"]["n"] > 0 and "## Gate: FAILED" in md
