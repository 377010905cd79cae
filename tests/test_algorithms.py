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


# ----------------------------------------------------------------------------- issue 12
from grpo.algorithms import importance_ratio, overlong_penalty  # noqa: E402


def test_rloo_leave_one_out_hand_numbers():
    # group [1, 0, 0]: baselines mean of the others = [0, 0.5, 0.5] -> [1, -0.5, -0.5]
    # (= G/(G-1) * (r - mean) = 1.5 * [2/3, -1/3, -1/3])
    out = group_advantages(torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0]), group_size=3, scale="rloo")
    assert torch.allclose(out.advantages, torch.tensor([1.0, -0.5, -0.5, 0.0, 0.0, 0.0]), atol=1e-6)
    assert out.zero_variance.tolist() == [False, True]


def test_reinforce_pp_global_batch_normalisation_hand_numbers():
    # rewards [1, 0, 1, 1]: batch mean 0.75, unbiased var (0.0625*3 + 0.5625)/3 = 0.25, std 0.5
    # -> [0.5, -1.5, 0.5, 0.5]; the all-correct group [1, 1] gets +0.5 (no group baseline)
    out = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2, scale="reinforce_pp", eps=0.0)
    assert torch.allclose(out.advantages, torch.tensor([0.5, -1.5, 0.5, 0.5]), atol=1e-6)


def test_reinforce_pp_baseline_hand_numbers():
    # rewards [1, 0, 1, 1]: group-centred [0.5, -0.5, 0, 0]; its batch mean 0, unbiased
    # var (0.25 + 0.25) / 3 = 1/6, std 0.408248 -> [1.224745, -1.224745, 0, 0]
    out = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2, scale="reinforce_pp_baseline", eps=0.0)
    s = 0.5 / math.sqrt(1 / 6)
    assert torch.allclose(out.advantages, torch.tensor([s, -s, 0.0, 0.0]), atol=1e-6)


def test_gspo_sequence_ratio_hand_numbers():
    # sequence 0: log-ratios [0.2, -0.1, (masked 5.0)] -> mean 0.05 -> s = e^0.05 = 1.051271 at every token
    # sequence 1: log-ratio [0.4] -> s = e^0.4 = 1.491825
    logp = torch.tensor([[0.2, -0.1, 5.0], [0.4, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ratio = importance_ratio(logp, old, mask, "sequence")
    assert torch.allclose(ratio[0, :2], torch.full((2,), math.exp(0.05)), atol=1e-6)
    assert ratio[1, 0].item() == pytest.approx(math.exp(0.4), abs=1e-6)


def test_gspo_loss_clips_whole_sequences_hand_numbers():
    # GSPO: J = mean_i min(s_i A_i, clip(s_i, 1 - 3e-4, 1 + 4e-4) A_i). s = [1.051271, 0.99980002]
    # A = [1, -1]: seq 0 clipped to 1.0004 -> 1.0004; seq 1: min(-0.9998, -max(0.9998, 0.9997)) = -0.9998
    # loss = -(1.0004 - 0.99980002) / 2 = -0.00030
    logp = torch.tensor([[0.2, -0.1], [math.log(0.9998), 0.0]], requires_grad=True)
    old = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    out = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, epsilon_low=3e-4, epsilon_high=4e-4,
                      aggregation="seq_mean", ratio_level="sequence")
    assert out.loss.item() == pytest.approx(-(1.0004 - 0.9998) / 2, abs=1e-6)
    assert out.clipped[0].tolist() == [True, True] and out.clipped[1].tolist() == [False, False]
    out.loss.backward()
    # seq 1 unclipped: d(-s A / 2)/d logp_0 = -A * s * (1/|y|) / 2 = 0.9998 / 2; seq 0 clipped: no gradient
    assert logp.grad[1, 0].item() == pytest.approx(0.9998 / 2, abs=1e-6)
    assert logp.grad[0].abs().sum().item() == 0.0


def test_gspo_token_equals_gspo_with_sequence_advantages():
    # GSPO paper, eq. 14-15: with A_{i,t} = A_i, GSPO-token has GSPO's value and gradient
    torch.manual_seed(0)
    old = torch.randn(3, 4) * 0.1
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([0.5, -1.0, 2.0])
    grads, losses = [], []
    for level in ("sequence", "sequence_token"):
        logp = (old + torch.randn(3, 4, generator=torch.Generator().manual_seed(1)) * 1e-3).requires_grad_()
        out = policy_loss(logp, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2, ratio_level=level)
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append(logp.grad.clone())
    assert losses[0] == pytest.approx(losses[1], abs=1e-7)
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_log_ratio_and_k3_are_clamped_like_verl():
    # log-ratio 1000 -> clamped to 20: ratio e^20, finite; with A < 0 the unclipped branch is taken
    logp, old = torch.tensor([[1000.0]]), torch.tensor([[0.0]])
    ratio = importance_ratio(logp, old, torch.ones(1, 1))
    assert ratio.item() == pytest.approx(math.exp(20.0), rel=1e-6)
    out = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1), beta=0.1, ref_logprobs=torch.tensor([[0.0]]))
    assert torch.isfinite(out.loss)
    # k3 with d = ref - logp = 50: exponent clamped at 20, estimate clamped at 10
    assert kl_k3(torch.tensor([[0.0]]), torch.tensor([[50.0]])).item() == 10.0
    # small d unchanged: d = -0.5 -> e^-0.5 + 0.5 - 1 = 0.106531
    assert kl_k3(torch.tensor([[0.5]]), torch.tensor([[0.0]])).item() == pytest.approx(0.106531, abs=1e-6)


def test_overlong_penalty_dapo_hand_numbers():
    # L = 20, buffer 4: free up to 16; 18 -> (16 - 18)/4 = -0.5; 20 -> -1; factor 0.5 halves it
    lengths = torch.tensor([10, 16, 17, 18, 20])
    assert overlong_penalty(lengths, 20, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(lengths, 20, 4, factor=0.5).tolist() == [0.0, 0.0, -0.125, -0.25, -0.5]
    assert overlong_penalty(lengths, 20, 0).tolist() == [0.0] * 5
