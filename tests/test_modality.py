"""Modality-aware layers: VLMo multiway FFN and per-modality expert pools."""

import pytest
import torch
from timm.layers import Mlp

import mome
from mome.layers import ModalityMoE, MultiwayFFN


def test_multiway_picks_the_ffn_and_norm_of_each_modality():
    layer = MultiwayFFN(16, 32, modalities=("image", "text"), vl_expert=True)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.2)
    x = torch.randn(2, 7, 16)
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0, 1]])
    out = layer(x, ids)
    experts = layer.moe.experts
    for b in range(2):
        for n in range(7):
            m = int(ids[b, n])
            normed = torch.nn.functional.layer_norm(x[b, n], (16,), layer.norm.weight[m], layer.norm.bias[m], 1e-6)
            hidden = torch.nn.functional.gelu(normed @ experts.w_in[m].T + experts.b_in[m])
            expected = hidden @ experts.w_out[m].T + experts.b_out[m]
            torch.testing.assert_close(out[b, n], expected, atol=1e-5, rtol=1e-5)
    stats = mome.routing_stats(layer)["moe"]
    torch.testing.assert_close(stats["expert_load_per_modality"], torch.eye(2))
    vl = layer(x, ids, use_vl=True)
    torch.testing.assert_close(vl, layer.vl_ffn(layer.vl_norm(x)))


def test_multiway_errors():
    layer = MultiwayFFN(8, 16)
    with pytest.raises(ValueError, match="modality_ids"):
        layer(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="vl_expert"):
        layer(torch.randn(1, 3, 8), torch.zeros(1, 3, dtype=torch.long), use_vl=True)
    with pytest.raises(ValueError, match="modality_ids"):
        layer(torch.randn(1, 3, 8), torch.zeros(1, 2, dtype=torch.long))


def test_modality_moe_routes_within_pools_and_adds_shared_expert():
    layer = ModalityMoE(16, 32, {"image": 3, "text": 2}, top_k=1, num_shared_experts=1)
    assert isinstance(layer.shared_experts, Mlp)
    x = torch.randn(2, 9, 16)
    ids = torch.randint(0, 2, (2, 9))
    out = layer(x, ids)
    assert out.shape == x.shape
    load = layer.last_routing_stats["expert_load_per_modality"]
    assert torch.all(load[0, 3:] == 0) and torch.all(load[1, :3] == 0)
    # Without the shared expert, the output is exactly the routed part.
    routed = out - layer.shared_experts(x)
    layer.shared_experts = None
    torch.testing.assert_close(layer(x, ids), routed, atol=1e-5, rtol=1e-5)


def test_modality_moe_needs_modality_ids():
    layer = ModalityMoE(8, 16, [2, 2])
    with pytest.raises(ValueError, match="modality_ids"):
        layer(torch.randn(1, 3, 8))


def test_multiway_vl_pass_clears_modality_statistics():
    layer = MultiwayFFN(8, 16, vl_expert=True)
    x, ids = torch.randn(1, 4, 8), torch.tensor([[0, 0, 1, 1]])
    layer(x, ids)
    assert mome.routing_stats(layer)
    layer(x, ids, use_vl=True)
    assert mome.routing_stats(layer) == {}
