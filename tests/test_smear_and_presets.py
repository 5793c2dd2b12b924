"""SMEAR (merged experts per example) against a dense FFN of the averaged weights, and the Switch and GShard
presets of conf/moe composed from the command line."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from train_helpers import CONF, compose_train

import mome
from mome import InvalidArgumentError, InvalidInputError, UnsupportedOptionError
from mome.layers import SMEAR, Experts, GShardTop2Router, MoE, TopKRouter
from mome.lit.base import build_model
from mome.models._moe_vit import build_moe_ffn


def dense_ffn_of_merged_weights(layer: SMEAR, x: torch.Tensor) -> torch.Tensor:
    """Per example: ``p = softmax(W mean_m x)``, then one dense FFN whose every weight is ``sum_e p_e theta_e``,
    written out with plain matmuls (a Python loop over examples and experts)."""
    experts = layer.experts
    outputs = []
    for b in range(x.shape[0]):
        p = torch.softmax(layer.router.weight @ x[b].mean(dim=0), dim=-1)  # [E]
        w_in = sum(p[e] * experts.w_in[e] for e in range(layer.num_experts))
        w_out = sum(p[e] * experts.w_out[e] for e in range(layer.num_experts))
        hidden = x[b] @ w_in.T
        if experts.b_in is not None:
            hidden = hidden + sum(p[e] * experts.b_in[e] for e in range(layer.num_experts))
        if experts.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.gelu(gate) * up
        else:
            hidden = F.gelu(hidden)
        out = hidden @ w_out.T
        if experts.b_out is not None:
            out = out + sum(p[e] * experts.b_out[e] for e in range(layer.num_experts))
        outputs.append(out)
    return torch.stack(outputs)


@pytest.mark.parametrize(("gated", "bias"), [(False, True), (True, False)])
def test_smear_is_the_dense_ffn_of_the_router_averaged_expert_weights(gated, bias):
    torch.manual_seed(0)
    layer = SMEAR(6, 5, num_experts=3, gated=gated, bias=bias).double()
    with torch.no_grad():
        layer.router.weight.mul_(4.0)  # a router far from uniform, so the merge weights differ per example
    x = torch.randn(4, 7, 6, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    expected = dense_ffn_of_merged_weights(layer, x)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    params = [x, layer.router.weight, *(p for p in layer.experts.parameters())]
    target = torch.randn_like(out)
    got = torch.autograd.grad((out * target).sum(), params)
    want = torch.autograd.grad((expected * target).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    assert all(g.abs().sum() > 0 for g in got)  # every expert and the router are trained
    # one example given as [M, D] is that example of the batch
    torch.testing.assert_close(layer(x[1]), out[1], atol=1e-12, rtol=1e-10)


def test_smear_two_experts_by_hand():
    """D=2, H=1, ReLU, no biases. Router W = [[2 ln 3, 0], [0, 0]] on the mean token [.5, .5]: logits [ln 3, 0],
    p = [3/4, 1/4]. Expert 0: h = x_0, y = [h, 0]; expert 1: h = x_1, y = [0, 2h]. Merged: h = .75 x_0 + .25 x_1,
    y = [.75 h, .5 h]. Token [1, 0]: h = .75, y = [.5625, .375]; token [0, 1]: h = .25, y = [.1875, .125].
    (Mixing the experts' outputs instead would give [.75, 0] for the first token.)

    L = sum(y): dL/dw_out_bar = sum_t h_t = 1 per row, dL/dh_t = .75 + .5, dL/dw_in_bar = 1.25 * sum_t x_t = [1.25,
    1.25]; expert e's gradient is p_e times the merged one. dL/dp_e = <dL/dtheta_bar, theta_e> = 1.25 + 1 = 2.25
    (e=0) and 1.25 + 2 = 3.25 (e=1); sum_e p_e dL/dp_e = 2.5, dL/dlogits = p (g - 2.5) = [-.1875, .1875],
    dL/dW = dL/dlogits (x) [.5, .5]."""
    layer = SMEAR(2, 1, num_experts=2, act_layer=nn.ReLU, bias=False)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[2 * math.log(3.0), 0.0], [0.0, 0.0]]))
        layer.experts.w_in.copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))  # [E, H, D]
        layer.experts.w_out.copy_(torch.tensor([[[1.0], [0.0]], [[0.0], [2.0]]]))  # [E, D, H]
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    out = layer(x)
    torch.testing.assert_close(out, torch.tensor([[[0.5625, 0.375], [0.1875, 0.125]]]))
    out.sum().backward()
    torch.testing.assert_close(layer.experts.w_in.grad, torch.tensor([[[0.9375, 0.9375]], [[0.3125, 0.3125]]]))
    torch.testing.assert_close(layer.experts.w_out.grad, torch.tensor([[[0.75], [0.75]], [[0.25], [0.25]]]))
    torch.testing.assert_close(layer.router.weight.grad, torch.tensor([[-0.09375, -0.09375], [0.09375, 0.09375]]))
    stats = layer.last_routing_stats
    torch.testing.assert_close(stats["expert_load"], torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(stats["router_entropy"], torch.tensor(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


@pytest.mark.parametrize("shape", [(0, 5, 8), (3, 0, 8)], ids=["no examples", "no tokens"])
def test_smear_empty_batch_gives_an_empty_finite_output(shape):
    layer = SMEAR(8, 16, num_experts=4)
    x = torch.randn(shape, requires_grad=True)
    out = layer(x)
    assert out.shape == shape
    out.sum().backward()
    grads = [layer.router.weight.grad, *(p.grad for p in layer.experts.parameters())]
    assert all(g is not None and torch.isfinite(g).all() and not g.any() for g in grads)
    stats = layer.last_routing_stats
    assert all(torch.isfinite(value).all() for value in stats.values())
    assert stats["expert_load"].shape == (4,)


def test_smear_reports_its_router_probabilities_and_no_loss():
    torch.manual_seed(0)
    model = nn.Sequential(SMEAR(8, 16, num_experts=4))
    x = torch.randn(5, 3, 8)
    model(x)
    stats = mome.routing_stats(model)["0"]
    p = torch.softmax(x.mean(dim=1) @ model[0].router.weight.T, dim=-1)
    torch.testing.assert_close(stats["expert_load"], p.mean(dim=0))
    torch.testing.assert_close(stats["router_entropy"], -(p * p.log()).sum(-1).mean())
    assert set(stats) == {"expert_load", "router_entropy"}  # nothing is dropped: no drop statistics
    assert mome.aux_losses(model) == {}


def test_smear_checks_its_arguments_and_input():
    with pytest.raises(InvalidArgumentError, match="num_experts"):
        SMEAR(8, 16, num_experts=0)
    with pytest.raises(InvalidArgumentError, match="experts"):
        SMEAR(8, 16, num_experts=4, experts=Experts(3, 8, 16))
    with pytest.raises(UnsupportedOptionError, match="dispatch_dtype"):
        SMEAR(8, 16, num_experts=4, experts=Experts(4, 8, 16, dispatch_dtype="bfloat16"))
    layer = SMEAR(8, 16, num_experts=4)
    with pytest.raises(InvalidInputError, match="x"):
        layer(torch.randn(2, 3, 7))
    with pytest.raises(InvalidInputError, match="x"):
        layer(torch.randn(1, 2, 3, 8))


def test_upcycled_smear_computes_the_dense_ffn():
    """Every expert a copy of the dense FFN: any average of them is that FFN, whatever the router says."""
    from timm.layers import Mlp

    torch.manual_seed(0)
    dense = Mlp(8, 16)
    layer = build_moe_ffn(dense, 4, 2, "smear", "noisy_top_k", 1, {}, upcycle=True)
    assert isinstance(layer, SMEAR)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-6, rtol=1e-5)


def test_vmoe_with_smear_layers_trains():
    torch.manual_seed(0)
    model = mome.create_model("vmoe_tiny_patch8_e4", moe_type="smear")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SMEAR)}
    assert list(layers) == ["blocks.1.mlp", "blocks.3.mlp"] and not any(isinstance(m, MoE) for m in model.modules())
    logits = model(torch.randn(3, 3, 32, 32))
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for layer in layers.values():
        for param in (layer.router.weight, *layer.experts.parameters()):
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.any()
    assert set(mome.routing_stats(model)) == set(layers)


@pytest.mark.parametrize(
    "option",
    [
        {"top_k": 1},
        {"router": "top_k"},
        {"moe_kwargs": {"capacity_factor": 1.25}},
        {"group_size_images": 2},
        {"dispatch_dtype": "bfloat16"},
        {"slots_per_expert": 2},
    ],
    ids=lambda option: next(iter(option)),
)
def test_options_a_smear_layer_does_not_use_are_refused(option):
    name = next(iter(option))
    with pytest.raises(UnsupportedOptionError, match=f"vmoe_tiny_patch8_e4 does not take {name}="):
        mome.create_model("vmoe_tiny_patch8_e4", moe_type="smear", **option)


# ------------------------------------------------------------------------------------------ Switch and GShard
#: What each preset must build: router class, experts per token, capacity factor, aux loss weights, and the
#: capacity (tokens per expert) of 64 tokens over the tiny model's 4 experts.
PRESETS = {
    # Switch (Fedus et al. 2021): top-1, capacity factor 1.25 (ceil(1.25 T / E)), load balance 0.01, and the
    # ST-MoE router z-loss 0.001 (Zoph et al. 2022)
    "switch_z_loss": (TopKRouter, 1, 1.25, {"load_balance": 0.01, "z_loss": 0.001}, 20),
    # GShard (Lepikhin et al. 2020): top-2 with a sampled second expert, capacity 2T/E (Algorithm 1), load balance
    "gshard": (GShardTop2Router, 2, 1.0, {"load_balance": 0.01}, 32),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_composed_on_vmoe_digits_builds_exactly_its_layers(preset, tmp_path):
    router_type, top_k, capacity_factor, weights, capacity = PRESETS[preset]
    cfg = compose_train(tmp_path, ["experiment=vmoe_digits", f"moe={preset}"])
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(layers) == 2
    for layer in layers:
        assert type(layer.router) is router_type and layer.router.top_k == top_k
        assert getattr(layer.router, "noise_std", 0.0) == 0.0 and not getattr(layer.router, "batch_priority", False)
        assert layer.capacity_factor == layer.eval_capacity_factor == capacity_factor
        assert layer.aux_loss_weights == weights
        assert layer.capacity(64) == capacity
    if router_type is GShardTop2Router:
        assert all(layer.router.sample_second for layer in layers)
    model.train()
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    assert set(mome.aux_losses(model)) == set(weights)


def test_gshard_router_needs_two_experts_per_token():
    with pytest.raises(InvalidArgumentError, match="top_k"):
        mome.create_model("vmoe_tiny_patch8_e4", router="gshard", top_k=1)


def test_smear_recipe_composes_into_the_model(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=vmoe_digits", "moe=smear"])
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    assert sum(isinstance(m, SMEAR) for m in model.modules()) == 2


def test_adding_the_moe_group_on_the_command_line_names_the_plain_choice():
    """``mome-train experiment=vmoe_digits +moe=gshard``: the group is in the defaults list (``moe: null``), so
    ``+`` would add a second entry; the command stops with one line naming ``moe=gshard``."""
    result = subprocess.run(
        [sys.executable, "-m", "mome.cli.train", "--cfg", "job", "experiment=vmoe_digits", "+moe=gshard"],
        cwd=CONF.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "select the option with moe=gshard" in lines[0], result.stderr
