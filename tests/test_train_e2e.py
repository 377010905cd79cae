"""End to end on a tiny random model: `grpo train` runs, learns something, resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from grpo.cli import main
from grpo.config import load_config
from grpo.trainer import Trainer
from conftest import tiny_run_config


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _lora_init(model_dir, tmp_path, plugin):
    """Adapter weights right after setup (before any update), for the 'changed' check."""
    cfg = load_config(None, tiny_run_config(model_dir, tmp_path / "init", plugin))
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    try:
        return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    finally:
        trainer.cleanup()


def test_two_step_train_end_to_end(tiny_model_dir, toy_plugin, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--no-progress", *_cfg_args(tiny_model_dir, run_dir, toy_plugin)])
    assert code == 0
    # run directory contents
    for name in ("config.yaml", "metrics.jsonl", "reward.png", "summary.json", "before_after.md",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("loss", "kl", "clip_fraction", "grad_norm", "time/generate", "reward/digit_share", "errors/digit_share"):
        assert key in train[0], key
    assert any("heldout/accuracy" in r for r in records)
    # adapter weights changed from their initial values (LoRA B starts at zero)
    final = _adapter(run_dir)
    lora_b = [v for k, v in final.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)


def test_final_adapter_loads_with_peft(tiny_model_dir, toy_plugin, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    assert main(["train", "--no-progress", *_cfg_args(tiny_model_dir, run_dir, toy_plugin, steps=1)]) == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    ids = torch.tensor([[1, 10, 11]])
    assert model(ids).logits.shape[-1] == base.config.vocab_size


def _cfg_args(model_dir, run_dir, plugin, **kw):
    return ["/dev/null" if False else _empty_config(run_dir), *tiny_run_config(model_dir, run_dir, plugin, **kw)]


def _empty_config(run_dir):
    path = run_dir.parent / "empty.yaml"
    path.write_text("# all settings come from overrides\n")
    return str(path)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("kill_after_step", [2, 3])
def test_resume_matches_uninterrupted_run_bit_for_bit(tiny_model_dir, toy_plugin, tmp_path, monkeypatch, kill_after_step):
    steps = 4
    straight = tmp_path / "straight"
    assert main(["train", "--no-progress", *_cfg_args(tiny_model_dir, straight, toy_plugin, steps=steps,
                                                      checkpoint_every=2)]) == 0

    interrupted = tmp_path / "interrupted"
    original_log = Trainer.train

    def killed_train(self):
        log = self.metrics.log

        def log_then_die(step, metrics):
            log(step, metrics)
            if step == kill_after_step and "reward/mean" in metrics and self.step == kill_after_step:
                if kill_after_step % 2 == 0:
                    self._save_checkpoint()  # the checkpoint at a multiple of 2 is written, then the kill
                raise Interrupt()

        self.metrics.log = log_then_die
        return original_log(self)

    monkeypatch.setattr(Trainer, "train", killed_train)
    args = _cfg_args(tiny_model_dir, interrupted, toy_plugin, steps=steps, checkpoint_every=2)
    with pytest.raises(Interrupt):
        main(["train", "--no-progress", *args])
    monkeypatch.setattr(Trainer, "train", original_log)
    assert main(["train", "--no-progress", "--resume", *args]) == 0

    a, b = _adapter(straight), _adapter(interrupted)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # metrics were not duplicated by the replayed steps
    steps_logged = [json.loads(l)["step"] for l in (interrupted / "metrics.jsonl").read_text().splitlines()
                    if "reward/mean" in json.loads(l)]
    assert steps_logged == [1, 2, 3, 4]


def test_fresh_run_refuses_to_overwrite_checkpoints(tiny_model_dir, toy_plugin, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = _cfg_args(tiny_model_dir, run_dir, toy_plugin, steps=1)
    assert main(["train", "--no-progress", *args]) == 0
    assert main(["train", "--no-progress", *args]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_without_checkpoint_is_a_clear_error(tiny_model_dir, toy_plugin, tmp_path, capsys):
    args = _cfg_args(tiny_model_dir, tmp_path / "none", toy_plugin, steps=1)
    assert main(["train", "--no-progress", "--resume", *args]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tiny_model_dir, toy_plugin, tmp_path, monkeypatch, capsys):
    import grpo.trainer as trainer_mod

    real = trainer_mod.policy_loss
    calls = {"n": 0}

    def poisoned(*a, **kw):
        out = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] > 1:  # step 1 has a single micro-batch; step 2 diverges
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(trainer_mod, "policy_loss", poisoned)
    run_dir = tmp_path / "run"
    args = _cfg_args(tiny_model_dir, run_dir, toy_plugin, steps=3, checkpoint_every=1,
                     **{"rollout.prompts_per_step": 1, "optim.micro_batch_size": 8})
    assert main(["train", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "step-000001" in err
    assert (run_dir / "checkpoints" / "step-000001" / "state.json").exists()


@pytest.mark.parametrize("overrides", [
    {"loss.beta": 0.0},
    {"loss.aggregation": "token_mean", "loss.epsilon_high": 0.28, "loss.mask_truncated": True},
    {"loss.aggregation": "constant", "loss.advantage_scale": "none", "loss.drop_zero_variance": True},
    {"loss.update_passes": 2, "loss.old_logprobs": "recompute", "loss.tis_cap": 2.0},
    {"loss.old_logprobs": "rollout", "loss.advantage_scale": "batch", "optim.schedule": "cosine",
     "optim.warmup_steps": 1},
], ids=["beta0", "dapo", "dr_grpo", "mu2_tis", "rollout_old"])
def test_objective_variants_run(tiny_model_dir, toy_plugin, tmp_path, overrides):
    run_dir = tmp_path / "run"
    args = _cfg_args(tiny_model_dir, run_dir, toy_plugin, steps=1, **{"eval.at_start": False, **overrides})
    assert main(["train", "--no-progress", *args]) == 0
    rec = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rec if "loss" in r)
    assert all(json.dumps(v) != "NaN" for v in step.values())
    if overrides.get("loss.beta") == 0.0:
        assert step["kl"] == 0.0
