"""The shared training skeleton (grpo/training.py): LR schedule by hand, clipping, seeding, run directory."""

from __future__ import annotations

import math
import random

import pytest
import torch
import yaml

from grpo import checkpoint
from grpo.errors import UserError
from grpo.training import claim_run_dir, clip_gradients, lr_factor, make_optimizer, seed_everything


def test_lr_factor_warmup_then_each_schedule_by_hand():
    # warmup 2 of 10 steps: steps 0, 1 -> 1/2, 2/2; afterwards progress = (step - 2) / 8
    assert [lr_factor(s, 2, "constant", 10) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    # linear: 1 - progress; step 4 -> 1 - 2/8 = 0.75, step 10 -> 0, past the end stays 0
    assert [lr_factor(s, 2, "linear", 10) for s in (2, 4, 10, 12)] == [1.0, 0.75, 0.0, 0.0]
    # cosine: (1 + cos(pi * progress)) / 2; step 6 -> progress 1/2 -> 0.5, step 4 -> (1 + cos(pi/4)) / 2 = 0.853553
    assert lr_factor(6, 2, "cosine", 10) == pytest.approx(0.5)
    assert lr_factor(4, 2, "cosine", 10) == pytest.approx(0.853553, abs=1e-6)
    assert lr_factor(10, 2, "cosine", 10) == pytest.approx(0.0, abs=1e-12)
    # no warmup: step 0 is the full rate; a single-step run does not divide by zero
    assert lr_factor(0, 0, "linear", 4) == 1.0 and lr_factor(1, 0, "linear", 4) == 0.75
    assert lr_factor(0, 0, "cosine", 0) == 1.0
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_factor(5, 0, "exponential", 10)


def test_make_optimizer_applies_the_schedule_and_saves_no_closure():
    w = torch.nn.Parameter(torch.zeros(2))
    opt, sched = make_optimizer([w], lr=0.1, weight_decay=0.0, warmup_steps=0, schedule="linear", total_steps=4,
                                betas=(0.8, 0.9))
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    lrs = []
    for _ in range(4):
        w.grad = torch.ones(2)
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx([0.075, 0.05, 0.025, 0.0])  # 0.1 * (1 - k/4)
    assert sched.state_dict()["lr_lambdas"] == [None]  # a plain function: nothing pickled into checkpoints


def test_clip_gradients_returns_the_norm_before_clipping():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # total norm sqrt(9 + 16) = 5
    assert clip_gradients([a, b], 1.0) == pytest.approx(5.0)
    assert a.grad.tolist() == pytest.approx([0.6, 0.0], abs=1e-5) and b.grad.tolist() == pytest.approx([0.8], abs=1e-5)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert clip_gradients([a, b], 0.0) == pytest.approx(5.0)  # 0 = off: measured, not clipped
    assert b.grad.item() == 4.0
    c = torch.nn.Parameter(torch.zeros(1))
    assert clip_gradients([c], 0.0) == 0.0  # no gradients at all
    a.grad = torch.tensor([math.inf, 0.0])
    assert not math.isfinite(clip_gradients([a], 0.0))  # the trainers turn this into a divergence error


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), float(torch.rand(1)), __import__("numpy").random.rand()

    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first
    seed_everything(8)
    assert draw() != first


def test_claim_run_dir_writes_config_checks_resume_and_releases_the_lock_on_errors(tmp_path):
    run = tmp_path / "run"
    lock, resumed = claim_run_dir(run, {"seed": 3, "optim": {"lr": 0.5}}, resume=False)
    assert resumed is None
    assert yaml.safe_load((run / "config.yaml").read_text()) == {"seed": 3, "optim": {"lr": 0.5}}
    with pytest.raises(UserError, match="in use by another run"):  # held while the run lives
        claim_run_dir(run, {"seed": 3}, resume=False)
    lock.release()
    bogus = run / "checkpoints" / f"{checkpoint.PREFIX}000002"
    bogus.mkdir(parents=True)
    (bogus / checkpoint.STATE_JSON).write_text("{}")
    with pytest.raises(UserError, match="already holds checkpoints: add --resume"):
        claim_run_dir(run, {"seed": 5}, resume=False)
    for _ in range(2):  # the second try fails the same way: the first released the lock
        with pytest.raises(UserError, match="not written by grpo train"):
            claim_run_dir(run, {"seed": 5}, resume=True)
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 3  # untouched by the refusals
