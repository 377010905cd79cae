"""Config loading: every shipped YAML validates; bad input gives one clear line."""

import re
from pathlib import Path

import pytest

from grpo.cli import main
from grpo.config import RunConfig, apply_override, describe, load_config, read_yaml_mapping
from grpo.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS, "configs/ holds no YAML"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_names_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must start with a comment showing its launch command"
    assert "grpo " in path.read_text().split("\n\n")[0], f"{path.name}: header must show the grpo command"


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'loss.betaa'.*Did you mean 'beta'"):
        load_config(_write(tmp_path, "loss:\n  betaa: 0.1\n"))
    with pytest.raises(UserError, match=r"'stpes'.*Did you mean 'steps'"):
        load_config(None, ["stpes=3"])


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(UserError, match=r"loss.beta: expected number, got 'abc'"):
        load_config(_write(tmp_path, "loss:\n  beta: abc\n"))
    with pytest.raises(UserError, match=r"steps: expected integer, got 1.5"):
        load_config(None, ["steps=1.5"])
    with pytest.raises(UserError, match=r"rollout.engine: expected one of"):
        load_config(None, ["rollout.engine=tgi"])
    with pytest.raises(UserError, match=r"expected true/false"):
        load_config(None, ["loss.mask_truncated=maybe"])


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(UserError, match="config section loss: expected a mapping"):
        load_config(_write(tmp_path, "loss: 3\n"))


def test_range_checks():
    with pytest.raises(UserError, match="num_generations must be >= 2"):
        load_config(None, ["rollout.num_generations=1"])
    with pytest.raises(UserError, match="eval.k values"):
        load_config(None, ["eval.num_samples=2", "eval.k=[1,4]"])


def test_int_accepted_where_float_expected_and_overrides_parse_yaml():
    cfg = load_config(None, ["loss.beta=0", "optim.betas=[0.9, 0.95]", "model.lora_target_modules=[q_proj]"])
    assert cfg.loss.beta == 0.0 and isinstance(cfg.loss.beta, float)
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.model.lora_target_modules == ["q_proj"]


def test_override_syntax_errors():
    with pytest.raises(UserError, match="expected key=value"):
        apply_override({}, "loss.beta")
    with pytest.raises(UserError, match="is not a section"):
        apply_override({"steps": 3}, "steps.x=1")


def test_invalid_yaml_reports_line(tmp_path):
    with pytest.raises(UserError, match="line 2"):
        load_config(_write(tmp_path, "steps: 3\nloss: a: b\n"))


def test_describe_lists_every_key_with_help():
    text = "\n".join(describe())
    for key in ("loss.beta", "rollout.num_generations", "optim.lr", "eval.k", "model.lora_rank"):
        assert key in text


@pytest.mark.parametrize("argv, message", [
    (["train", "missing.yaml"], "config file not found: missing.yaml"),
    (["train", "{cfg}", "nosuch=1"], "unknown config key 'nosuch'"),
    (["train", "{cfg}", "loss.beta=x"], "loss.beta: expected number"),
    (["train", "{cfg}", "model.name=/no/such/model/dir"], "model path not found: /no/such/model/dir"),
    (["train", "{cfg}", "model.name=./nowhere.gguf"], "model file not found: ./nowhere.gguf"),
    (["train", "{cfg}", "task.name=arithh"], "unknown task 'arithh'. Did you mean 'arith'"),
])
def test_cli_errors_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    cfg = _write(tmp_path, f"output_dir: {tmp_path / 'run'}\n")
    argv = [a.replace("{cfg}", str(cfg)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert len(err.splitlines()) == 1, err


def test_empty_dataset_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    plugin = tmp_path / "p.py"
    plugin.write_text(
        "from grpo.registry import TASKS\nfrom tasks.loaders import read_records\n"
        f"@TASKS.register('from_file')\nclass T:\n    def rows(self, split):\n        return read_records({str(empty)!r})\n")
    cfg = _write(tmp_path, f"output_dir: {tmp_path / 'run'}\nplugins: [{plugin}]\ntask: {{name: from_file}}\n")
    assert main(["train", str(cfg)]) == 2
    assert "no records (the dataset is empty)" in capsys.readouterr().err


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 parses 1e-5 as a string; a float key accepts it as the number it means
    assert load_config(_write(tmp_path, "optim:\n  lr: 1e-5\n")).optim.lr == 1e-5


def test_a_key_written_twice_is_an_error_with_both_lines(tmp_path):
    # YAML keeps the last: a pasted second `loss:` block silently dropped the first one's beta
    path = _write(tmp_path, "loss:\n  beta: 0.5\nsteps: 3\nloss:\n  epsilon_high: 0.28\n")
    with pytest.raises(UserError, match=r"line 4 invalid YAML: key 'loss' appears twice \(lines 1 and 4\)"):
        load_config(path)
    with pytest.raises(UserError, match="key 'lr' appears twice"):
        load_config(_write(tmp_path, "optim: {lr: 0.1, lr: 0.2}\n"))
    merged = _write(tmp_path, "defaults: &d\n  beta: 0.1\nloss:\n  <<: *d\n  beta: 0.2\n")
    assert read_yaml_mapping(merged)["loss"] == {"beta": 0.2}  # a merge key may be overridden


def test_tis_cap_with_rollout_old_logprobs_is_rejected():
    # Both would correct the engine/trainer difference: the ratio pi/pi_engine and the TIS weight.
    with pytest.raises(UserError, match="twice"):
        load_config(None, ["loss.old_logprobs=rollout", "loss.tis_cap=2"])
    load_config(None, ["loss.old_logprobs=recompute", "loss.tis_cap=2"])
    with pytest.raises(UserError, match="tis_cap with model.lora_dropout > 0"):  # it would weigh dropout noise
        load_config(None, ["model.lora_dropout=0.1", "loss.tis_cap=2"])


def test_preset_expands_and_conflicts_are_errors():
    cfg = load_config(None, ["loss.preset=dr_grpo"])
    assert cfg.loss.advantage_scale == "none" and cfg.loss.aggregation == "constant"
    cfg = load_config(None, ["loss.preset=dapo", "loss.epsilon_high=0.28"])  # agreeing value: fine
    assert cfg.rollout.dynamic_sampling and cfg.loss.aggregation == "token_mean" and cfg.loss.epsilon_high == 0.28
    cfg = load_config(None, ["loss.preset=gspo"])
    assert cfg.loss.ratio_level == "sequence" and cfg.loss.epsilon_low == 3e-4
    cfg = load_config(None, ["loss.preset=gspo", "loss.epsilon_low=3e-4"])  # YAML 1.1 reads "3e-4" as text
    assert cfg.loss.epsilon_low == 3e-4
    with pytest.raises(UserError, match="loss.preset=dr_grpo sets loss.aggregation='constant'"):
        load_config(None, ["loss.preset=dr_grpo", "loss.aggregation=token_mean"])
    with pytest.raises(UserError, match="expected one of"):
        load_config(None, ["loss.preset=ppo"])


def test_truncated_vllm_logprobs_cannot_enter_the_loss():
    with pytest.raises(UserError, match="truncated distribution"):
        load_config(None, ["rollout.engine=vllm", "rollout.top_p=0.9", "loss.old_logprobs=rollout"])
    with pytest.raises(UserError, match="truncated distribution"):
        load_config(None, ["rollout.engine=vllm", "rollout.top_k=20", "loss.tis_cap=2.0"])
    load_config(None, ["rollout.engine=vllm", "rollout.top_p=0.9"])  # recompute-style: fine
    load_config(None, ["rollout.engine=hf", "rollout.top_p=0.9", "loss.old_logprobs=rollout"])  # HF: full softmax


def test_lora_dropout_with_rollout_old_logprobs_is_rejected():
    with pytest.raises(UserError, match="lora_dropout"):
        load_config(None, ["model.lora_dropout=0.1", "loss.old_logprobs=rollout"])
    with pytest.raises(UserError, match="overlong_buffer"):
        load_config(None, ["loss.overlong_buffer=100", "rollout.max_new_tokens=64"])


@pytest.mark.parametrize("override, message", [
    ("loss.advantage_eps=-1", "loss.advantage_eps must be > 0, got -1.0"),
    ("loss.advantage_eps=0", "loss.advantage_eps must be > 0"),
    ("loss.epsilon_low=1.5", "loss.epsilon_low must be > 0 and < 1"),
    ("loss.epsilon_high=0", "loss.epsilon_high must be > 0 and < 1"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm must be >= 0"),
    ("rollout.top_k=-5", "rollout.top_k must be >= 0"),
    ("eval.num_problems=-1", "eval.num_problems must be >= 0"),
    ("eval.every_n_steps=-2", "eval.every_n_steps must be >= 0"),
    ("optim.lr=.inf", "optim.lr must be a finite number"),
    ("optim.lr=.nan", "optim.lr must be a finite number"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1] must be >= 0 and < 1, got 1.0"),
    ("threads=-1", "threads must be >= 0"),
    ("optim.logprob_chunk_tokens=0", "optim.logprob_chunk_tokens must be > 0"),
    ("model.device=gpu", "model.device: expected a device: auto, cpu, mps, cuda or cuda:N, got 'gpu'"),
    ("output_dir=runs/{nme}", "output_dir: expected a path whose only {...} field is {name}"),
    ("seed=-1", "seed must be >= 0"),
    ("rollout.vllm.gpu_memory_utilization=2", "rollout.vllm.gpu_memory_utilization must be > 0 and <= 1"),
])
def test_numeric_and_string_ranges_are_checked(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, [override])


def test_valid_edge_values_pass():
    cfg = load_config(None, ["model.device=cuda:1", "optim.max_grad_norm=0", "rollout.top_k=0", "eval.num_problems=0",
                             "output_dir=out/{name}-x/{name}", "optim.betas=[0, 0.999]"])
    assert cfg.run_dir.as_posix() == "out/run-x/run"


def test_every_numeric_field_declares_its_range():
    import dataclasses
    import typing

    from grpo.config import RunConfig, VLLMOptions

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, f"{prefix}{f.name}.")
            elif tp in (int, float, list[int], list[float]):
                yield f"{prefix}{f.name}", f.metadata.get("check")

    unchecked = [k for cls in (RunConfig, VLLMOptions) for k, check in walk(cls) if not check]
    assert unchecked == []


def test_overrides_may_follow_flags_on_the_command_line(capsys):
    """`grpo train CONFIG --resume steps=24` (argparse alone hands a nargs='*' positional only the
    words before the first flag); a word that is no override is still an error."""
    from grpo.cli import build_parser, parse_args

    parser = build_parser()
    args = parse_args(parser, ["train", "c.yaml", "a.b=1", "--resume", "steps=24", "--no-progress", "x=y"])
    assert args.config == "c.yaml" and args.overrides == ["a.b=1", "steps=24", "x=y"] and args.resume
    args = parse_args(parser, ["rm", "train", "r.yaml", "--epochs", "2", "margin=0.5"])
    assert args.overrides == ["margin=0.5"] and args.epochs == 2
    for argv in (["train", "c.yaml", "--resume", "--bogus"], ["train", "c.yaml", "--resume", "other.yaml"],
                 ["list", "verifiers", "a=1"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(parser, argv)
        assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_an_empty_config_file_is_an_error_and_a_comment_means_defaults(tmp_path):
    from grpo.config import load_config

    (tmp_path / "empty.yaml").write_text("\n")
    with pytest.raises(UserError, match="empty.yaml is empty; for every default, put a comment in it"):
        load_config(tmp_path / "empty.yaml")
    (tmp_path / "defaults.yaml").write_text("# defaults\n")
    assert load_config(tmp_path / "defaults.yaml").steps > 0


def test_task_arguments_of_the_wrong_type_are_one_line():
    from grpo.build import build_task

    with pytest.raises(UserError, match=r"task 'arith': task.args.digits must be an integer, got 'abc'"):
        build_task("arith", {"digits": "abc"})
    with pytest.raises(UserError, match=r"task 'gsm8k': task.args.path must be text, got 5"):
        build_task("gsm8k", {"path": 5})
    assert build_task("arith", {"digits": 2, "heldout_fraction": 0.5}).digits == 2  # an int is a float too


def test_reinforce_pp_keeps_the_groups_with_equal_rewards():
    from grpo.config import load_config

    for option in ("loss.drop_zero_variance=true", "rollout.dynamic_sampling=true"):
        with pytest.raises(UserError, match="advantage_scale=reinforce_pp normalises over the batch"):
            load_config(None, ["loss.advantage_scale=reinforce_pp", option])
    load_config(None, ["loss.advantage_scale=reinforce_pp_baseline", "loss.drop_zero_variance=true"])
