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


def test_adapter_is_identity_only_for_a_fresh_plain_lora(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from grpo.models import add_lora, adapter_is_identity

    def fresh():
        return add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 4, 8, 0.0, ["q_proj", "v_proj"])

    model = fresh()
    assert adapter_is_identity(model)
    b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        b[0, 0] = 1e-30  # one non-zero entry anywhere is a moved adapter
    assert not adapter_is_identity(model)
    model = fresh()
    model.base_model.model.lm_head.weight.requires_grad_(True)  # something else trains
    assert not adapter_is_identity(model)
    model = fresh()
    for p in model.parameters():
        p.requires_grad_(False)
    assert not adapter_is_identity(model)  # no adapter at all


@pytest.mark.parametrize("passes", [1, 2])
def test_first_step_takes_the_reference_from_the_fresh_policy(tiny_model_dir, toy_plugin, tmp_path, passes, monkeypatch):
    """A fresh adapter is the identity: the first step skips the reference pass and uses the first
    policy pass's log-probs (also in later update passes, after the adapter moved). Two steps give
    what they give with the reference pass run."""
    from conftest import tiny_run_config

    from grpo.config import load_config
    from grpo.trainer import Trainer

    runs = {}
    for shortcut in (True, False):
        cfg = load_config(None, tiny_run_config(tiny_model_dir, tmp_path / str(shortcut), toy_plugin, **{
            "loss.beta": 0.1, "loss.update_passes": passes, "optim.micro_batch_size": 3}))
        trainer = Trainer(cfg, progress=False)
        trainer.setup()
        if not shortcut:
            monkeypatch.setattr(trainer, "_adapter_is_identity", lambda: False)
        reference_passes = []
        logprobs = trainer._logprobs

        def spy(batch, grad, adapters=True, **kw):
            reference_passes.append(not adapters)
            return logprobs(batch, grad, adapters, **kw)

        monkeypatch.setattr(trainer, "_logprobs", spy)
        try:
            steps = []
            for _ in range(2):
                reference_passes.clear()
                steps.append((trainer.train_step(trainer.sampling_params()), sum(reference_passes)))
        finally:
            trainer.cleanup()
        runs[shortcut] = steps
    (first, ref_first), (second, ref_second) = runs[True]
    assert ref_first == 0 and ref_second > 0  # skipped at step 1 only
    assert all(n > 0 for _, n in runs[False])
    if passes == 2:
        assert runs[False][0][0]["kl"] > 0  # the second pass moved away from the reference
    for (a, _), (b, _) in zip(runs[True], runs[False]):
        assert a["sequences_in_loss"] == b["sequences_in_loss"] > 0
        for key in ("loss", "kl", "ratio", "grad_norm", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_dropout_seeds_differ_across_ranks():
    """Every rank drew micro-batch i's masks from the same seed: the ranks' masks were identical."""
    from types import SimpleNamespace

    from grpo.dist import DistInfo
    from grpo.trainer import Trainer

    def seeds(rank):
        t = Trainer.__new__(Trainer)
        t.cfg = SimpleNamespace(seed=3, model=SimpleNamespace(lora_dropout=0.1))
        t.step, t.dist = 5, DistInfo(rank=rank, world_size=2)
        return t._dropout_seeds(3)

    assert len(set(seeds(0)) | set(seeds(1))) == 6
    assert seeds(0) == [(3 * 1_000_003 + 5) * 4099 + i for i in range(3)]  # one process: as before
