"""grpo/checkpoint.py directly (atomic save, rotation, listing, adapter loading) and the trainers'
shared save / resume on top of it (grpo.training.save_training / resume_training)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from grpo import checkpoint
from grpo.errors import UserError
from grpo.models import add_lora
from grpo.training import make_optimizer, resume_training, save_training


def _lora_model(tiny_model_dir, seed: int = 0, targets=("q_proj", "v_proj")):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return add_lora(model, rank=2, alpha=4, dropout=0.0, target_modules=list(targets))


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer(model):
    return make_optimizer((p for p in model.parameters() if p.requires_grad), lr=0.01, weight_decay=0.0,
                          warmup_steps=0, schedule="linear", total_steps=10)


def _one_step(model, optimizer, scheduler) -> None:
    loss = sum((p ** 2).sum() for p in model.parameters() if p.requires_grad) + sum(
        p.sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_save_training_then_resume_restores_weights_optimizer_schedule_rng_and_extras(tiny_model_dir, tmp_path):
    model = _lora_model(tiny_model_dir, seed=0)
    optimizer, scheduler = _optimizer(model)
    for _ in range(3):
        _one_step(model, optimizer, scheduler)
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    path = save_training(tmp_path, 3, model, optimizer, scheduler, {"seed": 0}, keep=2,
                                    extra={"sampler": {"epoch": 1, "index": 4}})
    assert path == tmp_path / "checkpoints" / "step-000003"
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    weights = _trainable(model)

    other = _lora_model(tiny_model_dir, seed=1)  # different LoRA init: resume must overwrite it
    assert any(not torch.equal(weights[n], p) for n, p in _trainable(other).items())
    opt2, sched2 = _optimizer(other)
    state = resume_training(checkpoint.find_resumable(tmp_path), other, opt2, sched2, lr=0.01, weight_decay=0.0)
    assert state["step"] == 3 and state["sampler"] == {"epoch": 1, "index": 4} and state["config"] == {"seed": 0}
    for name, value in _trainable(other).items():
        assert torch.equal(value, weights[name]), name
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == pytest.approx([0.01 * 0.7])  # linear: 1 - 3/10
    assert opt2.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws
    # and training continues identically from both
    _one_step(model, optimizer, scheduler)
    _one_step(other, opt2, sched2)
    for name, value in _trainable(other).items():
        assert torch.equal(value, _trainable(model)[name]), name


def test_rotation_keeps_the_newest_and_ignores_partial_directories(tiny_model_dir, tmp_path):
    model = _lora_model(tiny_model_dir)
    optimizer, scheduler = _optimizer(model)
    for step in (2, 10, 4, 12):
        save_training(tmp_path, step, model, optimizer, scheduler, {}, keep=2)
    # numeric order, not string order; the two newest steps survive
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000010", "step-000012"]
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000010", "step-000012"]  # no temporary left behind
    (root / ".tmp-abc").mkdir()  # a write killed before its rename
    (root / "step-000099").mkdir()  # no state file: never finished
    (root / "step-x").mkdir()  # not a step number
    assert checkpoint.latest(tmp_path) == root / "step-000012"
    assert checkpoint.latest(tmp_path / "elsewhere") is None


def test_saving_the_same_step_again_replaces_it(tiny_model_dir, tmp_path):
    model = _lora_model(tiny_model_dir)
    optimizer, scheduler = _optimizer(model)
    save_training(tmp_path, 5, model, optimizer, scheduler, {"v": 1}, keep=3)
    save_training(tmp_path, 5, model, optimizer, scheduler, {"v": 2}, keep=3)
    assert len(checkpoint.list_checkpoints(tmp_path)) == 1
    assert checkpoint.find_resumable(tmp_path)[1]["config"] == {"v": 2}


def test_resume_errors_speak_the_users_language(tiny_model_dir, tmp_path):
    model = _lora_model(tiny_model_dir)
    optimizer, scheduler = _optimizer(model)
    with pytest.raises(UserError, match="--resume: no checkpoint in .*start without --resume"):
        checkpoint.find_resumable(tmp_path)
    path = save_training(tmp_path, 1, model, optimizer, scheduler, {}, keep=1)
    narrower = _lora_model(tiny_model_dir, targets=("q_proj",))  # the checkpoint also has v_proj adapters
    with pytest.raises(UserError, match="does not match the model's adapters"):
        checkpoint.load(path, narrower)
    (path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="no adapter weights"):
        checkpoint.load_adapter(path, model)
    with pytest.raises(UserError, match="incomplete"):
        checkpoint.find_resumable(tmp_path)
