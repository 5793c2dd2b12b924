"""Router auxiliary losses: hand-computed values, gradient directions and the MoE wiring."""

import math

import pytest
import torch
from torch.testing import assert_close

import mome
from mome.layers import SparseMoE
from mome.layers import losses as L

# 3 tokens, 3 experts; first choices 0, 1, 0.
PROBS = [[0.5, 0.3, 0.2], [0.1, 0.7, 0.2], [0.6, 0.1, 0.3]]
TOP1 = [0, 1, 0]


def _h(p):
    """Entropy of a plain list of probabilities, 0 log 0 = 0."""
    return -sum(q * math.log(q) for q in p if q > 0)


def _phi(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _cv2(v):
    mean = sum(v) / len(v)
    return (sum((x - mean) ** 2 for x in v) / len(v)) / mean**2


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


# --- hand-computed values ---------------------------------------------------------------------


def test_load_balance_loss_by_hand():
    # f = (2/3, 1/3, 0); P = column means of PROBS.
    mean_p = [(0.5 + 0.1 + 0.6) / 3, (0.3 + 0.7 + 0.1) / 3, (0.2 + 0.2 + 0.3) / 3]
    expected = 3 * (2 / 3 * mean_p[0] + 1 / 3 * mean_p[1] + 0 * mean_p[2])
    got = L.load_balance_loss(_t(PROBS), torch.tensor(TOP1))
    assert_close(got, _t(expected))
    assert abs(expected - 7 / 6) < 1e-12  # = 3 * (0.8/3 + 1.1/9)


def test_importance_loss_by_hand_population_std():
    sums = [1.2, 1.1, 0.7]  # mean 1, deviations 0.2, 0.1, -0.3
    expected = ((0.04 + 0.01 + 0.09) / 3) / 1.0**2
    assert_close(L.importance_loss(_t(PROBS)), _t(expected))
    assert_close(L.coefficient_of_variation_squared(_t(sums)), _t(_cv2(sums)))


def test_noisy_top_k_selection_probs_and_load_loss_by_hand():
    logits = [[1.0, 0.0, -1.0], [0.2, 0.5, 0.1]]
    noisy = [[0.8, 0.3, -0.5], [0.0, 0.9, 0.4]]
    sigma, k = 0.5, 2
    expected = []
    for clean, noise in zip(logits, noisy, strict=True):
        eta = sorted(noise, reverse=True)[k - 1]  # k-th largest noisy logit: 0.3 and 0.4
        expected.append([1.0 - _phi((eta - z) / sigma) for z in clean])
    got = L.noisy_top_k_selection_probs(_t(logits), _t(noisy), sigma, k)
    assert_close(got, _t(expected))
    assert_close(got[0, 1], _t(1.0 - _phi(0.6)))
    load = [(expected[0][e] + expected[1][e]) / 2 for e in range(3)]
    assert_close(L.load_loss(got), _t(_cv2(load)))


def test_router_z_loss_by_hand():
    logits = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-4.0, -5.0, -6.0]]
    lse = [math.log(sum(math.exp(z) for z in row)) for row in logits]
    assert abs(lse[1] - math.log(3)) < 1e-12
    expected = sum(v * v for v in lse) / 3
    assert_close(L.router_z_loss(_t(logits)), torch.tensor(expected, dtype=torch.float32))
    half = L.router_z_loss(torch.tensor(logits, dtype=torch.bfloat16))
    assert half.dtype == torch.float32  # computed in fp32 whatever the input dtype


# 4 tokens of modalities 0, 1, 0, 1; modality 2 has no token.
ENT_PROBS = [[0.7, 0.2, 0.1], [0.0, 0.5, 0.5], [0.2, 0.2, 0.6], [1.0, 0.0, 0.0]]
ENT_MOD = [0, 1, 0, 1]


def test_local_entropy_loss_by_hand():
    h = [_h(p) for p in ENT_PROBS]
    assert abs(h[1] - math.log(2)) < 1e-12 and h[3] == 0.0
    got = L.local_entropy_loss(_t(ENT_PROBS), torch.tensor(ENT_MOD), num_modalities=3)
    assert_close(got, _t([(h[0] + h[2]) / 2, (h[1] + h[3]) / 2, 0.0]))
    assert_close(L.local_entropy_loss(_t(ENT_PROBS)), _t([sum(h) / 4]))


def test_global_entropy_loss_by_hand_and_threshold():
    marg0 = [(0.7 + 0.2) / 2, (0.2 + 0.2) / 2, (0.1 + 0.6) / 2]  # (0.45, 0.2, 0.35)
    marg1 = [0.5, 0.25, 0.25]
    h0, h1 = _h(marg0), _h(marg1)  # ~1.0487 and 1.0397 nats
    probs, mod = _t(ENT_PROBS), torch.tensor(ENT_MOD)
    assert_close(L.global_entropy_loss(probs, mod, 3), _t([-h0, -h1, 0.0]))
    everything = [sum(p[e] for p in ENT_PROBS) / 4 for e in range(3)]
    assert_close(L.global_entropy_loss(probs), _t([-_h(everything)]))
    # tau = log 3 > both entropies: max(0, tau - H) is positive; the empty modality still gives 0.
    tau = math.log(3)
    assert_close(L.global_entropy_loss(probs, mod, 3, threshold=tau), _t([tau - h0, tau - h1, 0.0]))
    # tau = 1.045 lies between h1 and h0: modality 0 is clamped to 0, modality 1 is not.
    assert h1 < 1.045 < h0
    got = L.global_entropy_loss(probs, mod, 3, threshold=1.045)
    assert_close(got, _t([0.0, 1.045 - h1, 0.0]))


def test_soft_minimum_threshold():
    assert L.soft_minimum_threshold(4) == pytest.approx(math.log(4))
    assert L.soft_minimum_threshold(1) == 0.0


# --- gradient directions ----------------------------------------------------------------------


def _step(logits, loss_fn, lr=0.1):
    logits = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(logits), logits)
    assert grad.abs().sum() > 0
    return (logits - lr * grad).detach()


def test_z_loss_step_shrinks_logsumexp():
    logits = torch.cat([torch.randn(3, 4) + 3.0, torch.randn(3, 4) - 5.0])  # lse > 0 and lse < 0
    new = _step(logits, L.router_z_loss, lr=0.05)
    assert L.router_z_loss(new) < L.router_z_loss(logits)
    assert (torch.logsumexp(new, -1).abs() < torch.logsumexp(logits, -1).abs()).all()


def test_local_entropy_step_sharpens_tokens():
    logits, mod = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0])
    new = _step(logits, lambda z: L.local_entropy_loss(z.softmax(-1), mod, 2).sum())
    assert (new.softmax(-1).amax(-1) > logits.softmax(-1).amax(-1)).all()


def test_global_entropy_step_spreads_marginal():
    logits, mod = torch.randn(8, 4) + torch.tensor([2.0, 0.0, 0.0, -1.0]), torch.tensor([0, 1] * 4)
    new = _step(logits, lambda z: L.global_entropy_loss(z.softmax(-1), mod, 2).sum())
    before, after = (-L.global_entropy_loss(z.softmax(-1), mod, 2) for z in (logits, new))
    assert (after > before).all()  # marginal entropy H(mean p) grew in each modality
    # Once clamped by the threshold, the term has no gradient.
    z = logits.clone().requires_grad_(True)
    L.global_entropy_loss(z.softmax(-1), mod, 2, threshold=0.01).sum().backward()
    assert torch.count_nonzero(z.grad) == 0


def test_load_balance_step_relieves_overused_expert():
    logits = torch.randn(8, 4) + torch.tensor([3.0, 0.0, 0.0, 0.0])  # expert 0 takes every token
    top1 = logits.argmax(-1)
    assert (top1 == 0).all()
    new = _step(logits, lambda z: L.load_balance_loss(z.softmax(-1), top1))
    assert new.softmax(-1)[:, 0].mean() < logits.softmax(-1)[:, 0].mean()


def test_uniform_router():
    probs = torch.full((6, 3), 1 / 3)
    assert_close(L.load_balance_loss(probs, torch.tensor([0, 1, 2, 0, 1, 2])), torch.tensor(1.0))
    assert_close(L.load_balance_loss(probs, torch.zeros(6, dtype=torch.long)), torch.tensor(1.0))
    assert_close(L.importance_loss(probs), torch.tensor(0.0))


# --- wiring into the MoE layer ----------------------------------------------------------------


def test_sparse_moe_records_weighted_losses():
    model = SparseMoE(8, 16, 4, 2, aux_loss_weights={"load_balance": 0.5, "z_loss": 0.1})
    x = torch.randn(2, 5, 8)
    model(x)
    logits = x.reshape(10, 8) @ model.router.proj.weight.detach().T
    probs = logits.softmax(-1)
    raw_lb = L.load_balance_loss(probs, probs.argmax(-1))
    raw_z = L.router_z_loss(logits)
    stats = mome.routing_stats(model)
    losses = mome.aux_losses(model)
    assert set(losses) == {"load_balance", "z_loss"}
    assert_close(losses["load_balance"], 0.5 * raw_lb)
    assert_close(losses["z_loss"], 0.1 * raw_z)
    assert "loss/load_balance" in stats[""] and "loss/z_loss" in stats[""]
    assert_close(stats[""]["loss/load_balance"], raw_lb)  # unweighted
    sum(losses.values()).backward()
    assert model.router.proj.weight.grad.abs().sum() > 0
    assert mome.aux_losses(model) == {}  # reading cleared the record
    assert "loss/load_balance" in mome.routing_stats(model)[""]  # stats are not cleared
    assert mome.aux_losses(torch.nn.Linear(3, 3)) == {}


def test_aux_losses_sum_over_layers():
    layers = torch.nn.Sequential(*(SparseMoE(8, 16, 4, 2, aux_loss_weights={"z_loss": 1.0}) for _ in range(2)))
    layers(torch.randn(2, 5, 8))
    per_layer = [layer.last_aux_losses["z_loss"] for layer in layers]
    assert_close(mome.aux_losses(layers, clear=False)["z_loss"], per_layer[0] + per_layer[1])
    assert set(mome.routing_stats(layers)) == {"0", "1"}


def test_load_loss_only_in_training():
    model = SparseMoE(8, 16, 4, 2, router="noisy_top_k", aux_loss_weights={"importance": 1, "load": 1})
    x = torch.randn(2, 5, 8)
    model.train()(x)
    assert set(mome.aux_losses(model)) == {"importance", "load"}
    model.eval()(x)
    assert set(mome.aux_losses(model)) == {"importance"}


def test_bad_aux_loss_weights():
    with pytest.raises(ValueError, match="bogus"):
        SparseMoE(8, 16, 4, 2, aux_loss_weights={"bogus": 1.0})
    with pytest.raises(ValueError):
        SparseMoE(8, 16, 4, 1, router="hash", aux_loss_weights={"load_balance": 0.01})
