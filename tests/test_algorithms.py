"""The GRPO maths against numbers worked out by hand (in the comments)."""

import math

import pytest
import torch

from grpo.algorithms import aggregate, group_advantages, kl_k3, masked_mean, policy_loss


def test_group_advantages_grpo_hand_numbers():
    # groups [1, 0] and [0, 1]: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.70711
    # advantage = +-0.5 / (0.70711 + 1e-4) = +-0.70701
    out = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2, scale="group", eps=1e-4)
    expected = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert torch.allclose(out.advantages, torch.tensor([expected, -expected, -expected, expected]), atol=1e-6)
    assert out.zero_variance.tolist() == [False, False]


def test_group_advantages_zero_variance_group_is_zero_and_counted():
    # group [1, 1, 1] has std 0: advantage 0 (not NaN); group [0, 3, 0]: mean 1, std sqrt((1+4+1)/2)=sqrt(3)
    out = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 3.0, 0.0]), group_size=3, eps=1e-4)
    s = math.sqrt(3.0) + 1e-4
    assert torch.allclose(out.advantages, torch.tensor([0.0, 0.0, 0.0, -1 / s, 2 / s, -1 / s]), atol=1e-6)
    assert out.zero_variance.tolist() == [True, False]


def test_group_advantages_no_std_scaling_dr_grpo():
    # Dr. GRPO: r - mean_group only. groups [2, 0] (mean 1) and [1, 0] (mean 0.5)
    out = group_advantages(torch.tensor([2.0, 0.0, 1.0, 0.0]), group_size=2, scale="none")
    assert out.advantages.tolist() == [1.0, -1.0, 0.5, -0.5]


def test_group_advantages_batch_std():
    # rewards [1, 0, 0, 0]; group means [0.5, 0] -> centred [0.5, -0.5, 0, 0]
    # batch std: mean 0.25, unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25 -> std 0.5 -> [1, -1, 0, 0]
    out = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=2, scale="batch", eps=0.0)
    assert torch.allclose(out.advantages, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_group_advantages_matches_loop():
    torch.manual_seed(0)
    rewards = torch.rand(6 * 5)
    out = group_advantages(rewards, group_size=5, eps=1e-4).advantages
    for p in range(6):
        group = rewards[p * 5:(p + 1) * 5].tolist()
        mean = sum(group) / 5
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 4)
        for g in range(5):
            assert out[p * 5 + g].item() == pytest.approx((group[g] - mean) / (std + 1e-4), abs=1e-5)


def test_group_advantages_rejects_ragged_batch():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), group_size=2)


def test_kl_k3_hand_numbers():
    # logp = ln 0.5, ref = ln 0.25: d = ln 0.5 = -0.693147; k3 = e^d - d - 1 = 0.5 + 0.693147 - 1 = 0.193147
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    # identical distributions: exactly 0
    assert kl_k3(logp, logp).item() == 0.0


def _ratios(values):
    """old = 0, logp = ln(ratio): so exp(logp - old) is the given ratio."""
    return torch.log(torch.tensor([values])), torch.zeros(1, len(values))


def test_policy_loss_clipping_cases():
    # one sequence per case so the per-token numbers read directly (token_mean over 1 token each)
    # A=+1, ratio 1.5, eps_high 0.2: min(1.5, 1.2) = 1.2 -> loss -1.2, clipped
    # A=-1, ratio 0.5, eps_low 0.2:  min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped
    # A=+1, ratio 0.5: min(0.5, 0.8) = 0.5 -> loss -0.5, not clipped
    # A=-1, ratio 1.5: min(-1.5, -1.2) = -1.5 -> loss 1.5, not clipped
    cases = [(1.0, 1.5, -1.2, True), (-1.0, 0.5, 0.8, True), (1.0, 0.5, -0.5, False), (-1.0, 1.5, 1.5, False)]
    for adv, ratio, loss, clipped in cases:
        logp, old = _ratios([ratio])
        out = policy_loss(logp, old, torch.tensor([adv]), torch.ones(1, 1), epsilon_low=0.2, epsilon_high=0.2)
        assert out.loss.item() == pytest.approx(loss, abs=1e-6), (adv, ratio)
        assert out.clipped.item() is clipped


def test_policy_loss_clip_higher_is_asymmetric():
    # DAPO clip-higher: eps_low 0.2, eps_high 0.28. A=+1, ratio 1.25 is inside [0.8, 1.28]: loss -1.25
    logp, old = _ratios([1.25])
    out = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), epsilon_low=0.2, epsilon_high=0.28)
    assert out.loss.item() == pytest.approx(-1.25, abs=1e-6)
    assert not out.clipped.item()
    # ratio 0.7 with A=-1 is below 0.8: clipped to 0.8 -> min(-0.7, -0.8) = -0.8 -> loss 0.8
    logp, old = _ratios([0.7])
    out = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1), epsilon_low=0.2, epsilon_high=0.28)
    assert out.loss.item() == pytest.approx(0.8, abs=1e-6)


def test_policy_loss_adds_beta_k3():
    # ratio 1 (logp = old = ln 0.5), A = 2 -> surrogate 2; ref = ln 0.25 -> k3 = 0.193147
    # loss = -2 + 0.1 * 0.193147 = -1.9806853
    logp = torch.tensor([[math.log(0.5)]])
    out = policy_loss(logp, logp.clone(), torch.tensor([2.0]), torch.ones(1, 1), beta=0.1,
                      ref_logprobs=torch.tensor([[math.log(0.25)]]))
    assert out.loss.item() == pytest.approx(-2 + 0.1 * (0.5 + math.log(2) - 1), abs=1e-6)
    with pytest.raises(ValueError):
        policy_loss(logp, logp, torch.tensor([1.0]), torch.ones(1, 1), beta=0.1)


PER_TOKEN = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])  # 9s sit under the mask
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_aggregation_variants_hand_numbers():
    masked = PER_TOKEN * MASK
    # GRPO seq_mean: ((1 + 2) / 2 + 3 / 1) / 2 = (1.5 + 3) / 2 = 2.25
    assert aggregate(masked, MASK, "seq_mean").item() == pytest.approx(2.25)
    # DAPO token_mean: (1 + 2 + 3) / 3 tokens = 2.0
    assert aggregate(masked, MASK, "token_mean").item() == pytest.approx(2.0)
    # Dr. GRPO constant: (1 + 2 + 3) / (2 sequences * 4 max tokens) = 0.75
    assert aggregate(masked, MASK, "constant", max_tokens=4).item() == pytest.approx(0.75)


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean", "constant"])
def test_micro_batches_sum_to_full_batch_loss(aggregation):
    torch.manual_seed(1)
    logp, old, ref = torch.randn(4, 5) * 0.1 - 2, torch.randn(4, 5) * 0.1 - 2, torch.randn(4, 5) * 0.1 - 2
    adv = torch.randn(4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    kw = dict(beta=0.05, aggregation=aggregation, num_sequences=4, num_tokens=int(mask.sum()), max_tokens=5)
    full = policy_loss(logp, old, adv, mask, ref_logprobs=ref, **kw).loss
    parts = sum(policy_loss(logp[s], old[s], adv[s], mask[s], ref_logprobs=ref[s], **kw).loss
                for s in (slice(0, 1), slice(1, 3), slice(3, 4)))
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_masked_tokens_do_not_contribute_gradient():
    logp = torch.zeros(1, 3, requires_grad=True)
    out = policy_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[1, 1, 0]]), aggregation="token_mean")
    out.loss.backward()
    # d(-ratio * A)/d logp = -ratio * A / n_tokens = -1 / 2 on real tokens, 0 on the pad
    assert logp.grad.tolist() == [[-0.5, -0.5, 0.0]]


def test_masked_mean():
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1, 1, 0])) == 2.0
    assert masked_mean(torch.tensor([1.0]), torch.tensor([0])) == 0.0


def test_truncated_importance_weights_scale_the_surrogate():
    from grpo.algorithms import truncated_importance_weights

    # trainer ln 0.5 vs engine ln 0.25: weight 2, capped at 1.5; trainer 0.25 vs engine 0.5: 0.5 (no cap below)
    w = truncated_importance_weights(torch.log(torch.tensor([[0.5, 0.25]])), torch.log(torch.tensor([[0.25, 0.5]])), 1.5)
    assert torch.allclose(w, torch.tensor([[1.5, 0.5]]))
    # ratio 1, A = 1: surrogate 1 per token; weights [1.5, 0.5] -> token_mean loss -(1.5 + 0.5) / 2 = -1
    logp = torch.zeros(1, 2)
    out = policy_loss(logp, logp, torch.tensor([1.0]), torch.ones(1, 2), aggregation="token_mean",
                      importance_weights=w)
    assert out.loss.item() == pytest.approx(-1.0)
