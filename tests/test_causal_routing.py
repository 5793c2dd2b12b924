"""The causal guard: a router that looks across the sequence (expert choice; batch-prioritised routing under a
capacity) leaks future tokens into the logits of past positions of a causal LM, so upcycling a causal LM refuses it
with one line unless the user opts in; token-choice routers pass."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Mlp

import mome
from mome.layers import CausalRoutingError, ExpertChoiceRouter, MoE, TopKRouter, check_causal_safe


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(config).eval()


def _expert_choice(dim, num_experts):
    return ExpertChoiceRouter(dim, num_experts, capacity_factor=1.0)


def test_expert_choice_in_a_causal_lm_is_refused_with_one_line():
    with pytest.raises(CausalRoutingError) as info:
        mome.upcycle(_llama(), num_experts=4, top_k=1, router=_expert_choice)
    message = str(info.value)
    assert "\n" not in message and "leaks future tokens into past logits" in message
    assert "ExpertChoiceRouter" in message and "allow_noncausal_routing=True" in message


def test_the_leak_is_real_and_opting_in_accepts_it():
    """With expert choice, changing the last token changes the logits of the first positions."""
    model = mome.upcycle(_llama(), num_experts=4, top_k=1, router=_expert_choice, allow_noncausal_routing=True)
    torch.manual_seed(1)
    tokens = torch.randint(0, 97, (1, 12))
    changed = tokens.clone()
    changed[0, -1] = (tokens[0, -1] + 1) % 97
    with torch.no_grad():
        before, after = model(tokens).logits, model(changed).logits
    assert (before[0, :-1] - after[0, :-1]).abs().max() > 1e-4  # past positions see the future token

    dense = mome.upcycle(_llama(), num_experts=4, top_k=1)  # token choice: the past does not change
    with torch.no_grad():
        before, after = dense(tokens).logits, dense(changed).logits
    torch.testing.assert_close(before[0, :-1], after[0, :-1], rtol=0, atol=1e-6)


def test_batch_priority_leaks_only_under_a_capacity():
    bpr = lambda dim, e: TopKRouter(dim, e, 1, batch_priority=True)  # noqa: E731
    with pytest.raises(CausalRoutingError, match="batch-prioritised routing under a capacity"):
        mome.upcycle(_llama(), num_experts=4, top_k=1, router=bpr, capacity_factor=1.0)
    mome.upcycle(_llama(), num_experts=4, top_k=1, router=bpr)  # dropless: the order of service changes nothing


def test_check_causal_safe_on_layers_and_routers():
    for router in (TopKRouter(8, 4, 2), TopKRouter(8, 4, 2, noise_std=1.0)):
        check_causal_safe(router)
        check_causal_safe(MoE.from_dense(Mlp(8, 16), 4, 2, router=router, capacity_factor=1.0))
    with pytest.raises(CausalRoutingError):
        check_causal_safe(ExpertChoiceRouter(8, 4))
    check_causal_safe(ExpertChoiceRouter(8, 4), allow_noncausal=True)


def test_moe_llava_routers_are_token_choice():
    model = mome.create_model("moe_llava_tiny_e4")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert layers
    for layer in layers:
        check_causal_safe(layer)
