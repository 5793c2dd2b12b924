"""The MoE layer as users compose it: timm drop-in, model-level losses/stats (torch.compile: test_dispatch_compile)."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import mome
from mome.layers import MoE, SparseMoE, timm_mlp_layer


def tiny_vit(**moe_kwargs):
    return VisionTransformer(
        img_size=16,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=3,
        mlp_layer=timm_mlp_layer(num_experts=4, top_k=2, **moe_kwargs),
    )


def test_drop_in_for_timm_mlp_and_model_level_losses():
    model = tiny_vit(aux_loss_weights={"load_balance": 0.01})
    assert sum(isinstance(m, MoE) for m in model.modules()) == 2
    logits = model(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 3)
    losses = mome.aux_losses(model, clear=False)
    assert set(losses) == {"load_balance"}
    per_layer = [m.last_aux_losses["load_balance"] for m in model.modules() if isinstance(m, MoE)]
    torch.testing.assert_close(losses["load_balance"], per_layer[0] + per_layer[1])
    total = logits.logsumexp(-1).mean() + sum(mome.aux_losses(model).values())
    total.backward()
    assert model.blocks[0].mlp.router.proj.weight.grad.abs().sum() > 0
    stats = mome.routing_stats(model)
    assert set(stats) == {"blocks.0.mlp", "blocks.1.mlp"}
    torch.testing.assert_close(stats["blocks.0.mlp"]["expert_load"].sum(), torch.tensor(1.0))
    assert mome.aux_losses(torch.nn.Linear(2, 2)) == {}


def test_eval_capacity_factor_and_dropped_statistics():
    layer = SparseMoE(16, 32, 4, 2, capacity_factor=0.5, eval_capacity_factor=None)
    x = torch.randn(2, 16, 16)
    layer.train()
    layer(x)
    assert layer.last_routing_stats["dropped_fraction"] > 0.4
    layer.eval()
    layer(x)
    assert layer.last_routing_stats["dropped_fraction"] == 0
    assert layer.capacity(32) is None


def test_router_logits_in_fp32_for_bf16_inputs():
    layer = SparseMoE(16, 32, 4, 2).to(torch.bfloat16)
    out = layer(torch.randn(2, 5, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    routing = layer.router(torch.randn(10, 16, dtype=torch.bfloat16))
    assert routing.router_logits.dtype == torch.float32


def test_grad_through_state_dict_roundtrip():
    layer = SparseMoE(16, 32, 4, 2, num_shared_experts=1)
    clone = SparseMoE(16, 32, 4, 2, num_shared_experts=1)
    clone.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(clone(x), layer(x))
    keys = set(layer.state_dict())
    assert {"router.proj.weight", "experts.w_in", "experts.w_out", "shared_experts.fc1.weight"} <= keys


# torch.compile (fullgraph, forward and backward equal to eager) of every layer kind, both dispatch paths
# included: tests/test_dispatch_compile.py.


def test_default_modality_applies_when_no_ids_are_given():
    layer = SparseMoE(8, 16, 4, 1, modality_experts=[[0, 1], [2, 3]], default_modality=1)
    layer(torch.randn(2, 3, 8))
    load = layer.last_routing_stats["expert_load_per_modality"]
    assert load[0].sum() == 0 and load[1, 2:].sum() > 0.99
    with pytest.raises(ValueError, match="default_modality"):
        SparseMoE(8, 16, 4, 1, default_modality=3)


def test_routing_statistics_are_computed_when_read_and_follow_the_last_forward(monkeypatch):
    """A forward defers its statistics (decoding and unlogged steps do not pay for them); reading them gives
    what an eager computation of the last forward's routing gives."""
    from mome.layers import moe as moe_module

    torch.manual_seed(0)
    layer = SparseMoE(16, 32, 4, 2, num_modalities=2).train()
    calls = []
    compute = moe_module.routing_statistics
    monkeypatch.setattr(moe_module, "routing_statistics", lambda *a: calls.append(1) or compute(*a))
    routings = []
    layer.router.register_forward_hook(lambda module, args, out: routings.append(out))
    modality = torch.tensor([[0, 1, 1, 0, 1, 0]])
    for _ in range(2):
        layer(torch.randn(1, 6, 16), modality_ids=modality)
    assert calls == [], "statistics computed in the forward pass"
    stats = layer.last_routing_stats
    assert calls == [1]
    last = routings[-1]
    expected = compute(last, (~last.dropped).sum(), 2)
    assert set(stats) >= set(expected) and stats["expert_load_per_modality"].shape == (2, 4)
    for name, value in expected.items():
        torch.testing.assert_close(stats[name], value, msg=name)
    assert layer.last_routing_stats is stats and calls == [1], "computed once"
    assert not stats["expert_load"].requires_grad


def test_a_layer_with_pending_statistics_pickles_with_them_computed():
    import pickle

    torch.manual_seed(0)
    layer = SparseMoE(16, 32, 4, 2, aux_loss_weights={"load_balance": 0.01}).eval()
    with torch.no_grad():
        layer(torch.randn(1, 6, 16))
    copy = pickle.loads(pickle.dumps(layer))
    assert set(copy.last_routing_stats) == set(layer.last_routing_stats) and copy.last_aux_losses
    for name, value in layer.last_routing_stats.items():
        torch.testing.assert_close(copy.last_routing_stats[name], value, msg=name)
    torch.testing.assert_close(copy.last_aux_losses["load_balance"], layer.last_aux_losses["load_balance"])
