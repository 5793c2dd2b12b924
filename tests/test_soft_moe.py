"""Soft MoE against a reference written from the paper's equations."""

import torch
from reference import expert_ffn

from mome.layers import SoftMoE


def reference_soft_moe(layer: SoftMoE, x: torch.Tensor) -> torch.Tensor:
    mu = layer.mu  # [D, S]
    x_hat = x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    mu_hat = mu / torch.sqrt((mu * mu).sum(0, keepdim=True) + 1e-6)
    outputs = []
    for b in range(x.shape[0]):
        logits = layer.scale * x_hat[b] @ mu_hat  # [M, S]
        dispatch = torch.softmax(logits, dim=0)
        combine = torch.softmax(logits, dim=1)
        slots = dispatch.T @ x[b]  # un-normalised tokens: [S, D]
        slot_out = torch.stack(
            [expert_ffn(layer.experts, s // layer.slots_per_expert, slots[s]) for s in range(slots.shape[0])]
        )
        outputs.append(combine @ slot_out)
    return torch.stack(outputs)


def test_soft_moe_matches_reference_forward_and_backward():
    layer = SoftMoE(16, 32, num_experts=4, slots_per_expert=2)
    with torch.no_grad():
        layer.scale.fill_(3.0)
    x = torch.randn(3, 10, 16, requires_grad=True)
    out = layer(x)
    expected = reference_soft_moe(layer, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    params = [x, layer.mu, layer.scale, layer.experts.w_in, layer.experts.w_out]
    got = torch.autograd.grad(out.square().sum(), params)
    want = torch.autograd.grad(expected.square().sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_soft_moe_scale_only_affects_logits():
    layer = SoftMoE(8, 16, num_experts=2)
    x = torch.randn(2, 5, 8)
    # Scaling the tokens scales what is dispatched (un-normalised) but not the routing weights.
    with torch.no_grad():
        layer.experts.b_in.zero_()
        layer.experts.b_out.zero_()
        layer.experts.act = torch.nn.Identity()
        torch.testing.assert_close(layer(2 * x), 2 * layer(x), atol=1e-5, rtol=1e-5)


def test_soft_moe_is_a_drop_in_ffn_and_reports_stats():
    layer = SoftMoE(8, 16, num_experts=4)
    out = layer(torch.randn(2, 6, 8))
    assert out.shape == (2, 6, 8)
    assert layer(torch.randn(6, 8)).shape == (6, 8)
    load = layer.last_routing_stats["expert_load"]
    assert load.shape == (4,)
    torch.testing.assert_close(load.sum(), torch.tensor(1.0))
