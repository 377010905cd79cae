"""Learned reward model: the Bradley-Terry loss by hand, preference-row validation with
line numbers, a tiny-model RM trained end to end and used as a verifier, build-pairs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import grpo.rm.verifier  # noqa: F401  (registers `reward_model` even under the dev shim)
from grpo.cli import main
from grpo.errors import UserError
from grpo.rewards import RewardRunner, pearson
from grpo.rm.data import encode_conversation, load_preferences, split_by_prompt
from grpo.rm.pairs import select_pairs
from grpo.rm.train import RMConfig, bradley_terry_loss, validate_rm
from grpo.config import load_config
from grpo.rm.verifier import RewardModelVerifier, RunningStats

REPO = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "say digits"}]


# ------------------------------------------------------------------------------ loss
def test_bradley_terry_loss_matches_hand_computed_values():
    chosen = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([1.0, 0.0, 1.0], requires_grad=True)
    # differences d = [1, 0, -2]; -log sigmoid(d) = log(1 + e^-d):
    #   log(1 + e^-1) = 0.313262, log 2 = 0.693147, log(1 + e^2) = 2.126928; mean = 1.044446
    out = bradley_terry_loss(chosen, rejected)
    assert out.loss.item() == pytest.approx(1.044446, abs=1e-6)
    assert out.accuracy == pytest.approx(1 / 3)  # only d = 1 counts; the tie d = 0 is not a win
    assert out.margin == pytest.approx(-1 / 3)  # mean of d
    # d loss / d chosen_i = -sigmoid(-d_i) / 3: sigmoid(-1) = 0.268941, sigmoid(0) = 0.5, sigmoid(2) = 0.880797
    out.loss.backward()
    assert chosen.grad.tolist() == pytest.approx([-0.089647, -0.166667, -0.293599], abs=1e-6)
    assert rejected.grad.tolist() == pytest.approx([0.089647, 0.166667, 0.293599], abs=1e-6)


def test_bradley_terry_loss_margin_and_centering():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    # margin 1 everywhere: d - m = [0, -1, -3]: log 2 = 0.693147, log(1 + e) = 1.313262,
    #   log(1 + e^3) = 3.048587; mean = 1.684999. Accuracy and margin stats ignore m.
    out = bradley_terry_loss(chosen, rejected, torch.ones(3))
    assert out.loss.item() == pytest.approx(1.684999, abs=1e-6)
    assert out.accuracy == pytest.approx(1 / 3)
    # per-pair margins [0.5, 0, 0]: log(1 + e^-0.5) = 0.474077; (0.474077 + 0.693147 + 2.126928) / 3 = 1.098051
    per_pair = bradley_terry_loss(chosen, rejected, torch.tensor([0.5, 0.0, 0.0]))
    assert per_pair.loss.item() == pytest.approx(1.098051, abs=1e-6)
    # centering: (c + r)^2 = [9, 0, 0], mean 3; 1.044446 + 0.1 * 3 = 1.344446
    assert bradley_terry_loss(chosen, rejected, center_rewards=0.1).loss.item() == pytest.approx(1.344446, abs=1e-6)
    # stable far from zero: -log sigmoid(-100) = 100 (a naive log(sigmoid) would give inf)
    far = bradley_terry_loss(torch.tensor([0.0, 100.0]), torch.tensor([100.0, 0.0]))
    assert far.loss.item() == pytest.approx(50.0, abs=1e-4)


def test_pearson_and_running_stats_by_hand():
    # x = [1, 2, 3], y = [1, 3, 2]: means 2, 2; sxy = 1, sxx = syy = 2; r = 1 / 2
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson([1, None, 2, 3], [1, 5, 3, 2]) == pytest.approx(0.5)  # unscored positions are left out
    assert pearson([1, 2, 3], [1, 1, 1]) is None  # undefined for a constant side
    assert pearson([1], [2]) is None
    stats = RunningStats()
    stats.update([1.0, 2.0])
    stats.update([3.0, 4.0])
    # mean 2.5; population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    assert (stats.count, stats.mean, stats.std) == (4, pytest.approx(2.5), pytest.approx(math.sqrt(1.25)))


# ------------------------------------------------------------------------- bad rows
BAD_FILE_LINES = [
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},                                   # 1 ok
    {"prompt": "2 + 3 =", "chosen": " 5"},                                                     # 2 missing rejected
    None,                                                                                      # 3 blank line
    {"prompt": "1 + 1 =", "chosen": " 2", "rejected": "2 "},                                   # 4 identical
    {"prompt": "1 + 2 =", "chosen": "", "rejected": " 4"},                                     # 5 empty chosen
    "{not json",                                                                               # 6 invalid JSON
    {"prompt": USER, "chosen": [{"role": "assistant", "content": "12"}],
     "rejected": [{"role": "assistant", "content": "ab"}], "margin": 0.5},                     # 7 ok, own margin
    {"prompt": "x", "chosen": [{"role": "assistant", "content": "1"}],
     "rejected": [{"role": "assistant", "content": "2"}]},                                     # 8 shape mismatch
    {"prompt": "3 + 3 =", "chosen": " 6", "rejected": " 7", "margin": "big"},                  # 9 bad margin
    {"chosen": USER + [{"role": "assistant", "content": "34"}],
     "rejected": USER + [{"role": "assistant", "content": "cd"}]},                             # 10 ok, implicit prompt
    [1, 2],                                                                                    # 11 not an object
    {"prompt": USER, "chosen": [{"role": "assistant", "content": "  "}],
     "rejected": [{"role": "assistant", "content": "x"}]},                                     # 12 empty message
]


def _write_lines(path: Path, items) -> Path:
    lines = ["" if x is None else x if isinstance(x, str) else json.dumps(x) for x in items]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_rejected_with_their_line_numbers(tmp_path):
    path = _write_lines(tmp_path / "prefs.jsonl", BAD_FILE_LINES)
    with pytest.raises(UserError) as err:
        load_preferences(path, "error")
    msg = str(err.value)
    assert "\n" not in msg
    assert "8 of 11 preference rows are bad" in msg
    assert "line 2: missing field 'rejected'" in msg
    assert "line 4: 'chosen' and 'rejected' are identical" in msg
    assert "line 5: 'chosen' is empty" in msg
    assert "line 6: not valid JSON" in msg
    assert "line 8: 'prompt' is text but the responses are messages" in msg
    assert "and 3 more" in msg and "bad_rows=skip" in msg


def test_bad_rows_are_skipped_with_a_warning_per_line(tmp_path, capsys):
    path = _write_lines(tmp_path / "prefs.jsonl", BAD_FILE_LINES)
    pairs = load_preferences(path, "skip")
    assert [p.where for p in pairs] == ["line 1", "line 7", "line 10"]
    err = capsys.readouterr().err
    assert "skipping 8 of 11 bad preference rows" in err
    for line, problem in [(2, "missing field 'rejected'"), (4, "'chosen' and 'rejected' are identical"),
                          (5, "'chosen' is empty"), (6, "not valid JSON"), (8, "'prompt' is text but"),
                          (9, "'margin' must be a finite number"), (11, "expected a JSON object"),
                          (12, "'chosen' is empty")]:
        assert f"prefs.jsonl: line {line}: {problem}" in err, (line, problem)
    assert pairs[1].margin == 0.5 and pairs[0].margin is None
    # the implicit prompt is the shared leading messages
    assert pairs[2].prompt == USER and pairs[2].chosen == [{"role": "assistant", "content": "34"}]


def test_rm_train_cli_reports_bad_rows_and_follows_the_switch(tmp_path, tiny_model_dir, capsys):
    path = _write_lines(tmp_path / "prefs.jsonl", BAD_FILE_LINES)
    code = main(["rm", "train", "--data", str(path), "--model", str(tiny_model_dir), "--output", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 2: missing field 'rejected'" in err
    assert not (tmp_path / "r" / "model").exists()


# ------------------------------------------------------------------------ formatting
def test_texts_are_formatted_like_the_policy_sees_them(tiny_model_dir):
    from grpo.models import load_tokenizer
    from grpo.prompts import encode_prompt

    tok = load_tokenizer(str(tiny_model_dir))
    ids, truncated = encode_conversation(tok, USER, "42")
    assert tok.decode(ids) == "<|user|>say digits<|end|><|assistant|>42<|end|>" and not truncated
    # the policy's prompt (chat template + generation prompt) is a prefix: the RM reads what the policy wrote after it
    assert ids[:len(encode_prompt(tok, USER))] == encode_prompt(tok, USER)
    # messages response == text response; system prompt prepended like the policy's
    assert encode_conversation(tok, USER, [{"role": "assistant", "content": "42"}])[0] == ids
    with_system, _ = encode_conversation(tok, USER, "42", system_prompt="be brief")
    assert tok.decode(with_system).startswith("<|system|>be brief<|end|><|user|>")
    # standard rows: plain concatenation
    assert tok.decode(encode_conversation(tok, "2 + 2 =", " 4")[0]) == "2 + 2 = 4"
    # too long: keep the end, where the score is read
    short, truncated = encode_conversation(tok, USER, "42", max_length=5)
    assert truncated and short == ids[-5:]


def test_heldout_split_keeps_prompts_apart():
    from grpo.rm.data import PreferencePair

    pairs = [PreferencePair(f"q{i}", f"good{j}", f"bad{j}") for i in range(10) for j in range(3)]
    train, heldout = split_by_prompt(pairs, 0.2, seed=0)
    assert len(heldout) == 6 and len(train) == 24
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    assert split_by_prompt(pairs, 0.2, seed=0) == (train, heldout)
    assert split_by_prompt(pairs, 0.0, seed=0) == (pairs, [])


# -------------------------------------------------------------------------- pairing
def test_select_pairs_pairs_correct_with_incorrect_and_spreads_them():
    texts = ["a", "b", "a", "c", " ", "d"]
    correct = [True, False, True, False, False, True]
    rewards = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    two = select_pairs(texts, rewards, correct, "correct", 0.5, 2, random.Random(0))
    assert len(two) == 2
    used = [i for pair in two for i in pair]
    assert len(set(used)) == 4  # two disjoint pairs when possible (no reuse of one completion)
    assert all(correct[i] and not correct[j] for i, j in two)
    everything = select_pairs(texts, rewards, correct, "correct", 0.5, 10, random.Random(0))
    # the duplicate 'a' (index 2) and the blank text (index 4) are never used
    assert sorted(everything) == [(0, 1), (0, 3), (5, 1), (5, 3)]
    by_reward = select_pairs(["x", "y", "z"], [0.9, 0.5, 0.1], [False] * 3, "reward", 0.3, 10, random.Random(0))
    assert sorted(by_reward) == [(0, 1), (0, 2), (1, 2)]
    assert select_pairs(["x", "y"], [0.5, 0.4], [False] * 2, "reward", 0.3, 10, random.Random(0)) == []


# ------------------------------------------------------------- train + verifier, tiny
def _digit_prefs(path: Path, n: int = 60, seed: int = 0) -> Path:
    """Chosen: digits; rejected: letters (a preference a tiny model learns in a few steps)."""
    rng = random.Random(seed)
    rows = [{"prompt": [{"role": "user", "content": f"say digits {i}"}],
             "chosen": [{"role": "assistant", "content": "".join(rng.choice("0123456789") for _ in range(6))}],
             "rejected": [{"role": "assistant", "content": "".join(rng.choice("abcdefghij") for _ in range(6))}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("rm")
    data = _digit_prefs(root / "prefs.jsonl")
    run_dir = root / "run"
    code = main(["rm", "train", "--data", str(data), "--model", str(tiny_model_dir), "--output", str(run_dir),
                 "--epochs", "3", "--lr", "0.01", "--no-progress", "eval_fraction=0.2", "model.device=cpu",
                 "model.lora_rank=4", "model.lora_alpha=8", "threads=1"])
    assert code == 0
    return run_dir


def test_rm_train_end_to_end(trained_rm):
    from transformers import AutoModelForSequenceClassification

    run_dir = trained_rm
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model/config.json", "model/model.safetensors",
                 "model/reward_model.json", "model/tokenizer.json"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "checkpoints").glob("step-*/adapter/adapter_model.safetensors"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "heldout/accuracy" in r]
    # 48 training pairs / 16 per step = 3 steps per epoch: evaluated at the start and after each epoch
    assert [r["step"] for r in evals] == [0, 3, 6, 9]
    assert all("heldout/margin" in r for r in evals)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 10))
    assert train[-1]["loss"] < train[0]["loss"]
    assert evals[-1]["heldout/accuracy"] >= 0.9 > evals[0]["heldout/accuracy"]
    assert evals[-1]["heldout/margin"] > 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["heldout_pairs"] == 12 and summary["train_pairs"] == 48
    # a standard model: plain transformers loads it (no peft, no custom code) with one output
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert model.config.num_labels == 1 and not any("lora" in k for k in model.state_dict())


def test_reward_model_verifier_scores_and_normalises(trained_rm):
    rows = [{"prompt": [{"role": "user", "content": "say digits 1000"}], "verifiers": {"reward_model": 1.0}}] * 4
    completions = ["123456", "abcdef", "987654", "ghijab"]
    raw = RewardModelVerifier(str(trained_rm / "model")).raw_scores(completions, [r["prompt"] for r in rows])
    assert raw[0] > raw[1] and raw[2] > raw[3]
    # the standard model scores the same text the same way
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(trained_rm / "model")
    tok = AutoTokenizer.from_pretrained(trained_rm / "model")
    text = tok.apply_chat_template(rows[0]["prompt"] + [{"role": "assistant", "content": "123456"}], tokenize=False)
    with torch.no_grad():
        direct = model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert direct == pytest.approx(raw[0], abs=1e-4)
    for normalize, check in [
        ("none", lambda v: v == pytest.approx(raw, abs=1e-5)),
        ("sigmoid", lambda v: v == pytest.approx([1 / (1 + math.exp(-r)) for r in raw], abs=1e-5)),
        ("running", lambda v: sum(v) == pytest.approx(0, abs=1e-5) and v[0] > v[1]),
    ]:
        with RewardRunner({"reward_model": {"path": str(trained_rm), "normalize": normalize}}) as runner:
            batch = runner.score(rows, completions)
        assert check(batch.per_verifier["reward_model"]), normalize
        assert batch.reasons["reward_model"][0] == f"rm score {raw[0]:+.3f}"
        assert batch.errors["reward_model"] == 0


def test_reward_model_correlation_with_rule_verifier_is_logged(trained_rm, toy_plugin):
    from grpo.build import load_plugins

    load_plugins([str(toy_plugin)])  # digit_share: a correctness-style rule verifier
    prompt = [{"role": "user", "content": "say digits 7"}]
    rows = [{"prompt": prompt, "verifiers": {"reward_model": 1.0, "digit_share": 0.0}}] * 4
    completions = ["123456", "abcdef", "12ab", "a1"]
    with RewardRunner({"reward_model": {"path": str(trained_rm)}}, workers=1) as runner:
        batch = runner.score(rows, completions)
    rm, rule = batch.per_verifier["reward_model"], batch.per_verifier["digit_share"]
    assert batch.total == pytest.approx(rm)  # weight 0: the rule verifier only measures
    metrics = batch.metrics()
    assert metrics["reward_corr/reward_model~digit_share"] == pytest.approx(pearson(rm, rule))
    assert metrics["reward_corr/reward_model~digit_share"] > 0.5


def test_reward_model_verifier_rejects_bad_arguments(tmp_path, tiny_model_dir, trained_rm):
    with pytest.raises(UserError, match="normalize must be one of"):
        RewardModelVerifier(str(trained_rm), normalize="zscore")
    with pytest.raises(UserError, match="reward model not found"):
        RewardModelVerifier(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="is not a reward model"):
        RewardModelVerifier(str(tiny_model_dir))  # a causal LM, no scalar head


def test_reward_model_verifier_checks_device_and_dtype_at_start(trained_rm):
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        RewardModelVerifier(str(trained_rm), device="gpu")
    with pytest.raises(UserError, match="unknown dtype 'fp16'"):
        RewardModelVerifier(str(trained_rm), dtype="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            RewardModelVerifier(str(trained_rm), device="cuda")


@pytest.mark.parametrize("normalize", ["none", "sigmoid", "running"])
def test_a_non_finite_reward_model_score_is_an_error_not_a_reward(trained_rm, normalize, monkeypatch):
    verifier = RewardModelVerifier(str(trained_rm), normalize=normalize)
    scores = iter([[float("nan"), 2.0, 0.0], [1.0, 3.0, float("inf")]])
    monkeypatch.setattr(verifier, "raw_scores", lambda completions, prompts: next(scores))
    for _ in range(2):
        out = verifier.score(["a", "b", "c"], [[{"role": "user", "content": "q"}]] * 3)
        bad = [s for s in out if s.reason.startswith("error: rejected reward ")]
        assert len(bad) == 1 and bad[0].reward == 0.0
        assert all(math.isfinite(s.reward) for s in out)
    if normalize == "running":
        assert verifier.stats.mean == pytest.approx((2.0 + 0.0 + 1.0 + 3.0) / 4)


def test_rm_train_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    data = _digit_prefs(tmp_path / "prefs.jsonl", n=18)
    common = ["rm", "train", "--data", str(data), "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"),
              "--no-progress", "model.device=cpu", "model.lora_rank=4", "batch_size=8", "eval_at_start=false",
              "threads=1"]
    assert main(common + ["--epochs", "1"]) == 0
    assert main(common + ["--epochs", "1"]) == 2  # checkpoints exist: refuse to overwrite without --resume
    assert main(common + ["--epochs", "2", "--resume"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # 16 training pairs (2 of 18 prompts held out) / 8 per step = 2 steps per epoch; resumed at step 2
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


# ---------------------------------------------------------------------- build-pairs
def test_resuming_a_finished_rm_run_evaluates_nothing_again(tmp_path, tiny_model_dir):
    data = _digit_prefs(tmp_path / "prefs.jsonl", n=18)
    args = ["rm", "train", "--data", str(data), "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"),
            "--no-progress", "model.device=cpu", "model.lora_rank=4", "batch_size=8", "threads=1", "--epochs", "1"]
    assert main(args) == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert main(args + ["--resume"]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    again = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert again["before"] == summary["before"] and again["after"] == summary["after"]


def test_build_pairs_then_train_on_them(tmp_path, tiny_model_dir, toy_plugin, capsys):
    out = tmp_path / "pairs.jsonl"
    args = ["rm", "build-pairs", "--task", "toy_digits", "--plugins", str(toy_plugin), "--model", str(tiny_model_dir),
            "--n", "6", "--num-prompts", "6", "--max-new-tokens", "12", "--pair-by", "reward", "--min-gap", "0.05",
            "--max-pairs-per-prompt", "3", "--device", "cpu", "--workers", "1", "--threads", "1", "--no-progress"]
    assert main(args + ["--out", str(out)]) == 0
    assert "pairs ->" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and len(rows) <= 18
    pairs = load_preferences(out, "error")  # valid preference rows, no bad ones
    assert len(pairs) == len(rows)
    task_prompts = [[{"role": "user", "content": f"say digits {i}"}] for i in range(6)]
    for row in rows:
        assert row["prompt"] in task_prompts
        assert row["chosen_reward"] - row["rejected_reward"] >= 0.05 - 1e-9
        assert row["chosen"][0]["role"] == "assistant" and row["chosen"] != row["rejected"]
        share = lambda msg: sum(ch.isdigit() for ch in msg[0]["content"]) / max(1, len(msg[0]["content"]))  # noqa: E731
        assert share(row["chosen"]) == pytest.approx(row["chosen_reward"])
    # the same seed gives the same pairs
    again = tmp_path / "again.jsonl"
    assert main(args + ["--out", str(again)]) == 0
    assert again.read_text() == out.read_text()
    # and they train a reward model
    assert main(["rm", "train", "--data", str(out), "--model", str(tiny_model_dir), "--output", str(tmp_path / "rm"),
                 "--no-progress", "model.device=cpu", "model.lora_rank=4", "eval_fraction=0.3", "threads=1"]) == 0
    assert (tmp_path / "rm" / "model" / "config.json").is_file()


def test_build_pairs_by_correctness_needs_a_pass_fail_check(tmp_path, tiny_model_dir, toy_plugin):
    # digit_share counts as correctness (1.0 = all digits), so this runs; a random model never gets 1.0
    code = main(["rm", "build-pairs", "--task", "toy_digits", "--plugins", str(toy_plugin), "--model",
                 str(tiny_model_dir), "--n", "2", "--num-prompts", "2", "--max-new-tokens", "4", "--device", "cpu",
                 "--workers", "1", "--no-progress", "--out", str(tmp_path / "p.jsonl")])
    assert code == 0 and (tmp_path / "p.jsonl").read_text() == ""


# ----------------------------------------------------------------------- cli/configs
def test_rm_cli_help_and_missing_data(capsys):
    assert main(["rm"]) == 2
    assert "build-pairs" in capsys.readouterr().out
    assert main(["rm", "train"]) == 2
    assert "needs a CONFIG file" in capsys.readouterr().err
    assert main(["rm", "train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "bad_rows" in out and "center_rewards" in out and "model.lora_rank" in out


RM_CONFIGS = sorted((REPO / "configs" / "rm").glob("*.yaml"))


def test_there_are_rm_configs():
    names = [p.name for p in RM_CONFIGS]
    assert any(n.startswith("grpo_") for n in names) and any(n.startswith("train_") for n in names)


@pytest.mark.parametrize("path", RM_CONFIGS, ids=lambda p: p.name)
def test_rm_configs_load_and_name_their_command(path):
    header = path.read_text().split("\n\n")[0]
    assert path.read_text().startswith("#") and "grpo " in header
    if path.name.startswith("grpo_"):  # a GRPO run rewarded by the reward model
        cfg = load_config(path)
        assert "reward_model" in cfg.task.args.get("verifiers", {})
        assert "reward_model" in cfg.task.verifier_args
    else:
        cfg = load_config(path, cls=RMConfig, prepare=None, check=validate_rm)
        assert cfg.data


def test_the_trained_head_is_float32_under_a_bf16_base(tiny_model_dir):
    """The head is trained fully, by AdamW: in bf16 small steps round away (12.5 % of the tiny
    model's head never moved in 3 epochs), so it is float32, fed upcast hidden states; the
    backbone stays bf16 and the rewards come out float32 with gradients for head and LoRA."""
    from grpo.rm.model import add_lora_with_head, forward_rewards, load_sequence_scorer

    model = load_sequence_scorer(str(tiny_model_dir), "bfloat16", "cpu")
    model.config.pad_token_id = 0
    model = add_lora_with_head(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    head = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert head and all(p.dtype == torch.float32 for p in head.values())
    assert any(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not p.requires_grad)
    rewards = forward_rewards(model, [[5, 6, 7], [8, 9]])
    rewards.sum().backward()
    assert rewards.dtype == torch.float32
    assert all(p.grad is not None for p in head.values())
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)


def test_reward_pairs_need_a_positive_gap():
    """min_gap 0 would pair a completion with itself (or with an equally rewarded one)."""
    from grpo.errors import UserError
    from grpo.rm.pairs import build_pairs

    with pytest.raises(UserError, match="min_gap must be > 0 with pair_by=reward"):
        build_pairs("arith", "unused", pair_by="reward", min_gap=0.0)


def test_build_pairs_to_an_unwritable_place_fails_before_sampling(tiny_model_dir, capsys):
    """The error came as a traceback, after all the sampling."""
    from grpo.cli import main

    assert main(["rm", "build-pairs", "--task", "arith", "--model", str(tiny_model_dir),
                 "--out", "/proc/no/such/pairs.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write --out") and "Traceback" not in err
