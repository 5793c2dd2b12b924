"""Sparse upcycling: a freshly upcycled MoE computes exactly what the dense FFN computed."""

import pytest
import torch
from timm.layers import GluMlp, Mlp, SwiGLU, SwiGLUPacked
from torch import nn

from mome import InvalidArgumentError
from mome.layers import Experts, MoE, SoftMoE, TopKRouter


def transformers_mlps():
    from transformers import LlamaConfig, PhiConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.phi.modeling_phi import PhiMLP

    llama = LlamaMLP(
        LlamaConfig(
            hidden_size=16, intermediate_size=40, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2
        )
    )
    phi = PhiMLP(PhiConfig(hidden_size=16, intermediate_size=40, hidden_act="gelu_new", num_attention_heads=2))
    return [("llama", llama), ("phi", phi)]


DENSE = [
    ("timm Mlp gelu", lambda: Mlp(16, 40)),
    ("timm Mlp no bias", lambda: Mlp(16, 40, bias=False)),
    ("timm SwiGLU", lambda: SwiGLU(16, 40)),
    ("timm SwiGLUPacked", lambda: SwiGLUPacked(16, 80)),
    ("timm GluMlp gate first", lambda: GluMlp(16, 80, act_layer=nn.Sigmoid, gate_last=False)),
    ("timm GluMlp gate last", lambda: GluMlp(16, 80, act_layer=nn.Sigmoid, gate_last=True)),
]


@pytest.mark.parametrize("name", [name for name, _ in DENSE] + ["llama", "phi"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_moe_reproduces_dense(name, top_k):
    builders = dict(DENSE)
    dense = builders[name]() if name in builders else dict(transformers_mlps())[name]
    for param in dense.parameters():  # non-trivial biases too
        nn.init.normal_(param, std=0.3)
    dense.eval()
    moe = MoE.from_dense(dense, num_experts=4, top_k=top_k).eval()
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        diff = (moe(x) - dense(x)).abs().max().item()
    assert diff < 1e-5, f"{name}: max abs diff {diff}"
    # all experts are copies; the router is fresh (random, not zero)
    assert torch.equal(moe.experts.w_in[0], moe.experts.w_in[3])
    assert moe.router.proj.weight.abs().sum() > 0


def test_upcycled_experts_are_independent_parameters():
    dense = Mlp(16, 32)
    experts = Experts.from_dense(dense, 3)
    with torch.no_grad():
        experts.w_in[0].add_(1.0)
    assert not torch.equal(experts.w_in[0], experts.w_in[1])
    assert torch.equal(experts.w_in[1], dense.fc1.weight)


def test_upcycled_soft_moe_runs_and_capacity_breaks_equivalence_honestly():
    dense = Mlp(16, 32).eval()
    soft = SoftMoE(16, 32, 4, experts=Experts.from_dense(dense, 4)).eval()
    x = torch.randn(2, 6, 16)
    assert soft(x).shape == x.shape
    # With a capacity limit some tokens lose an expert, so the output differs from the dense layer.
    moe = MoE.from_dense(dense, 4, top_k=2, capacity_factor=0.25).train()
    with torch.no_grad():
        assert (moe(x) - dense(x)).abs().max() > 1e-3


def test_upcycling_rejects_unknown_mlp():
    with pytest.raises(InvalidArgumentError, match="mlp must be an FFN it can upcycle.*got .Linear."):
        Experts.from_dense(nn.Linear(4, 4), 2)
    with pytest.raises(ValueError, match="norm"):
        Experts.from_dense(Mlp(16, 32, norm_layer=nn.LayerNorm), 2)


def test_from_dense_keeps_custom_router():
    router = TopKRouter(16, 4, 1)
    moe = MoE.from_dense(Mlp(16, 32), 4, router=router)
    assert moe.router is router
