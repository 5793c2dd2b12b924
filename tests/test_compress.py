"""Expert pruning and merging (mome.compress): hand-computed cases, the equivalences that must hold, the routers
whose per-expert tensors are sliced, save/reload round trips of each family, and the typed errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mome
from mome.compress import (
    expert_usage,
    match_hidden_units,
    merge_experts,
    permute_hidden_units,
    prune_experts,
)
from mome.layers import Experts, MoE, SparseMoE, TopKRouter


def routed_layer(weight, bias=None, hidden=8, top_k=1, renormalize=False, gated=False, experts_bias=True) -> MoE:
    """An MoE whose router is ``x W^T + b`` with the given rows (so which tokens go where is known)."""
    weight = torch.as_tensor(weight, dtype=torch.float32)
    num_experts, dim = weight.shape
    router = TopKRouter(dim, num_experts, top_k, renormalize=renormalize, bias=bias is not None)
    with torch.no_grad():
        router.proj.weight.copy_(weight)
        if bias is not None:
            router.proj.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return MoE(router, Experts(num_experts, dim, hidden, gated=gated, bias=experts_bias)).eval()


# -- pruning ---------------------------------------------------------------------------------------------------
def test_prune_keeps_the_most_used_experts_hand_computed():
    torch.manual_seed(0)
    layer = routed_layer(100 * torch.eye(4))  # token e_i goes to expert i, with probability 1
    tokens = torch.eye(4)[[0, 0, 0, 2, 2, 1]]  # expert 0: 3 tokens, 2: 2, 1: 1, 3: none
    usage = expert_usage(layer, [tokens])
    assert usage[""].counts.tolist() == [3.0, 1.0, 2.0, 0.0] and usage[""].tokens == 6
    pruned = prune_experts(layer, 2, usage=usage)
    assert pruned.num_experts == 2 and pruned.router.num_experts == 2 and pruned.router.proj.out_features == 2
    torch.testing.assert_close(pruned.experts.w_in, layer.experts.w_in[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(pruned.experts.b_out, layer.experts.b_out[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(pruned.router.proj.weight, layer.router.proj.weight[[0, 2]], rtol=0, atol=0)
    assert layer.num_experts == 4  # a copy was compressed
    with torch.no_grad():  # the tokens of the kept experts get the same output (top-1 of a one-hot softmax)
        kept_tokens = torch.eye(4)[[0, 2]]
        torch.testing.assert_close(pruned(kept_tokens), layer(kept_tokens))


@pytest.mark.parametrize("renormalize", [False, True])
def test_pruning_an_expert_no_token_routes_to_changes_nothing_at_dropless_routing(renormalize):
    torch.manual_seed(1)
    weight = torch.randn(4, 6)
    layer = routed_layer(weight, bias=[0.0, 0.0, 0.0, -1e4], top_k=2, renormalize=renormalize)  # expert 3: p = 0
    tokens = torch.randn(3, 20, 6)
    usage = expert_usage(layer, [tokens])
    assert usage[""].counts[3] == 0 and usage[""].counts.sum() == 2 * 60
    pruned = prune_experts(layer, 3, data=[tokens])
    assert pruned.router.proj.bias.tolist() == [0.0, 0.0, 0.0]
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens), layer(tokens), rtol=1e-6, atol=1e-6)


def test_prune_with_explicit_indices_and_the_per_expert_router_tensors():
    torch.manual_seed(2)
    layer = SparseMoE(8, 16, 6, 2, router="top_k", bias_update_rate=0.001).eval()  # DeepSeek-V3's aux-free bias
    layer.router.expert_bias.copy_(torch.arange(6.0))
    pruned = prune_experts(layer, {"": [5, 1, 3]})
    assert pruned.router.expert_bias.tolist() == [1.0, 3.0, 5.0]  # kept in index order
    assert pruned.router.expert_load.shape == (3,)
    pruned(torch.randn(2, 5, 8))  # runs with its new sizes


@pytest.mark.parametrize("router", ["top_k", "noisy_top_k", "gshard", "base", "sinkhorn", "xmoe"])
def test_every_handled_router_prunes_and_merges(router):
    torch.manual_seed(3)
    top_k = 1 if router in ("base", "sinkhorn", "xmoe") else 2
    layer = SparseMoE(8, 16, 5, top_k, router=router).eval()
    tokens = torch.randn(4, 10, 8)
    for compressed in (prune_experts(layer, 3, data=[tokens]), merge_experts(layer, 3, data=[tokens])):
        assert compressed.num_experts == compressed.router.num_experts == 3
        assert compressed(tokens).shape == tokens.shape
    if router == "xmoe":
        kept = prune_experts(layer, {"": [0, 4]})
        torch.testing.assert_close(kept.router.expert_embeddings, layer.router.expert_embeddings[[0, 4]])


# -- merging ---------------------------------------------------------------------------------------------------
def two_experts() -> MoE:
    """Expert 0: W_in = I, W_out = I. Expert 1: W_in = diag(3, 5), W_out = diag(2, 4) with its two hidden units
    stored swapped. The router sends token e_0 to expert 0 and e_1 to expert 1."""
    layer = routed_layer(10 * torch.eye(2), hidden=2, experts_bias=False)
    with torch.no_grad():
        layer.experts.w_in.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 5.0], [3.0, 0.0]]]))
        layer.experts.w_out.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [4.0, 0.0]]]))
    return layer


def test_merge_hand_computed_frequency_weights_after_alignment():
    layer = two_experts()
    assert match_hidden_units(layer.experts, 0, 1).tolist() == [1, 0]  # <u0, v1> = 9 + 0, <u1, v0> = 5 + 4
    tokens = torch.eye(2)[[0, 0, 0, 1]]  # frequencies 3 : 1
    merged = merge_experts(layer, 1, data=[tokens])
    assert merged.num_experts == 1
    # 0.75 I + 0.25 diag(3, 5) and 0.75 I + 0.25 diag(2, 4): the aligned expert 1, weighted 3 : 1
    torch.testing.assert_close(merged.experts.w_in[0], torch.tensor([[1.5, 0.0], [0.0, 2.0]]), rtol=0, atol=0)
    torch.testing.assert_close(merged.experts.w_out[0], torch.tensor([[1.25, 0.0], [0.0, 1.75]]), rtol=0, atol=0)
    torch.testing.assert_close(merged.router.proj.weight, layer.router.proj.weight[:1], rtol=0, atol=0)


def test_merge_groups_by_router_logit_similarity_hand_computed():
    # Logit columns over the tokens e_0, e_1, e_2: expert 0 = (1, 0, 0), 1 = (0, 1, 0), 2 = (0.9, 0.1, 0),
    # 3 = (0.1, 0.9, 0.1). Frequencies (top-1): expert 0 and 1 win their tokens, e_2's token goes to expert 3.
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.1, 0.0], [0.1, 0.9, 0.1]])
    layer = routed_layer(weight, hidden=4)
    tokens = torch.eye(3)[[0, 0, 1, 1, 2]]
    usage = expert_usage(layer, [tokens])
    assert usage[""].counts.tolist() == [2.0, 2.0, 0.0, 1.0]
    similarity = usage[""].similarity()
    assert similarity[2, 0] > similarity[2, 1] and similarity[3, 1] > similarity[3, 0]
    merged = merge_experts(layer, 2, usage=usage)  # groups {0, 2} and {1, 3}; expert 2 has weight 0
    experts = layer.experts
    expected = (2 * permute_hidden_units(experts, 1, torch.arange(4))["w_in"].double()) + (
        1 * permute_hidden_units(experts, 3, match_hidden_units(experts, 1, 3))["w_in"].double()
    )
    torch.testing.assert_close(merged.experts.w_in[0], experts.w_in[0])  # 2 * e0 + 0 * e2
    torch.testing.assert_close(merged.experts.w_in[1], (expected / 3).float())


@pytest.mark.parametrize("gated", [False, True])
def test_a_permuted_copy_aligns_back_exactly_and_computes_the_same_function(gated):
    torch.manual_seed(4)
    experts = Experts(2, 6, 16, gated=gated)
    permutation = torch.randperm(16)
    with torch.no_grad():
        copy = permute_hidden_units(experts, 0, permutation)
        for name, value in copy.items():
            getattr(experts, name)[1].copy_(value)
    tokens = torch.randn(5, 6)
    with torch.no_grad():
        out = experts.forward_batched(tokens.expand(2, 5, 6))  # [E, C, D]
    torch.testing.assert_close(out[1], out[0])  # a permutation of the hidden units is the same FFN
    found = match_hidden_units(experts, 0, 1)
    aligned = permute_hidden_units(experts, 1, found)
    for name, value in aligned.items():
        assert torch.equal(value, getattr(experts, name)[0]), name


def test_merging_identical_experts_changes_nothing_with_renormalised_dropless_routing():
    torch.manual_seed(5)
    layer = SparseMoE(8, 16, 6, 2, renormalize=True, gated=True, act_layer=nn.SiLU).eval()  # an upcycled layer:
    # every expert a copy of one FFN
    with torch.no_grad():
        for name in ("w_in", "w_out", "b_in", "b_out"):
            tensor = getattr(layer.experts, name)
            tensor.copy_(tensor[:1].expand_as(tensor))
    tokens = torch.randn(3, 12, 8)
    for groups in (2, 3, 5):
        merged = merge_experts(layer, groups, data=[tokens])
        with torch.no_grad():
            torch.testing.assert_close(merged(tokens), layer(tokens), rtol=1e-5, atol=1e-6)


def test_merging_into_as_many_groups_as_experts_changes_nothing_bitwise():
    torch.manual_seed(6)
    model = mome.create_model("vmoe_tiny_patch8_e4").eval()
    images = torch.randn(4, 3, 32, 32)
    merged = merge_experts(model, 4, data=[images])
    with torch.no_grad():
        assert torch.equal(merged(images), model(images))
    assert prune_experts(model, 4, data=[images]).mome_model_args == {"num_experts": 4}


def test_merging_the_identical_experts_of_an_upcycled_moe_llava_changes_nothing(tmp_path):
    torch.manual_seed(7)
    model = mome.create_model("moe_llava_tiny_e4", capacity_factor="dropless", eval_capacity_factor="dropless").eval()
    ids = torch.tensor([[1, 5, 8, 17, 18, 9, 6, 8], [1, 9, 6, 8, 5, 17, 18, 5]])
    merged = merge_experts(model, 2, data=[(ids,)])
    assert merged.config.num_experts == 2 and merged.mome_model_args["num_experts"] == 2
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    mome.save_pretrained(merged, tmp_path / "m")
    again = mome.create_model(f"local-dir:{tmp_path / 'm'}").eval()
    assert again.config.num_experts == 2 and again.language_model.layers[0].mlp.num_experts == 2
    with torch.no_grad():
        assert torch.equal(again(ids).logits, merged(ids).logits)


# -- save / reload ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["prune", "merge"])
def test_compressed_vmoe_saves_and_reloads_bitwise(tmp_path, how):
    torch.manual_seed(8)
    model = mome.create_model("vmoe_tiny_patch8_e4", num_experts=8).eval()
    images = torch.randn(4, 3, 32, 32)
    compress = prune_experts if how == "prune" else merge_experts
    small = compress(model, 5, data=[images])
    assert small.mome_model_args == {"num_experts": 8 - 3} and model.mome_model_args == {"num_experts": 8}
    mome.save_pretrained(small, tmp_path / "m")
    again = mome.create_model(f"local-dir:{tmp_path / 'm'}").eval()
    assert [block.mlp.num_experts for block in again.blocks[1::2]] == [5, 5]
    with torch.no_grad():
        assert torch.equal(again(images), small(images))


def test_compressed_limoe_saves_and_reloads_bitwise(tmp_path):
    torch.manual_seed(9)
    model = mome.create_model("limoe_tiny_patch8_e4", num_experts=6).eval()
    images = torch.randn(3, 3, 32, 32)
    text = torch.randint(1, 100, (3, 8))
    small = merge_experts(prune_experts(model, 5, data=[(images, text)]), 3, data=[(images, text)], inplace=True)
    assert small.num_experts == 3 and small.mome_model_args["num_experts"] == 3
    mome.save_pretrained(small, tmp_path / "m")
    again = mome.create_model(f"local-dir:{tmp_path / 'm'}").eval()
    with torch.no_grad():
        for ours, theirs in zip(again(images, text), small(images, text)):
            assert torch.equal(ours, theirs)


def test_compressed_moe_llava_prunes_saves_and_reloads(tmp_path):
    torch.manual_seed(10)
    model = mome.create_model("moe_llava_tiny_e4", llm="qwen2").eval()  # gated (SwiGLU) experts
    with torch.no_grad():  # distinct experts, so pruning is not a no-op
        for layer in model.language_model.layers[::2]:
            layer.mlp.experts.w_in.add_(0.01 * torch.randn_like(layer.mlp.experts.w_in))
    ids = torch.tensor([[1, 5, 8, 17, 18, 9, 6, 8]])
    small = prune_experts(model, 3, data=[{"input_ids": ids}])
    mome.save_pretrained(small, tmp_path / "m")
    again = mome.create_model(f"local-dir:{tmp_path / 'm'}").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, small(ids).logits)


# -- bad input -------------------------------------------------------------------------------------------------
def vmoe():
    return mome.create_model("vmoe_tiny_patch8_e4").eval()


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda m: prune_experts(m, 5, data=[torch.randn(2, 3, 32, 32)]), "keep"),  # keep > E
        (lambda m: prune_experts(m, 1, data=[torch.randn(2, 3, 32, 32)]), "keep"),  # keep < top_k
        (lambda m: prune_experts(m, 2.5, data=[torch.randn(2, 3, 32, 32)]), "keep"),
        (lambda m: prune_experts(m, 3), "data"),  # nothing to rank by
        (lambda m: prune_experts(m, {"blocks.1.mlp": [0, 1]}), "keep"),  # a layer left out
        (lambda m: prune_experts(m, {"blocks.1.mlp": [0, 0], "blocks.3.mlp": [0, 1]}), "keep['blocks.1.mlp']"),
        (lambda m: merge_experts(m, 0, data=[torch.randn(2, 3, 32, 32)]), "num_groups"),
        (lambda m: merge_experts(m, 1, data=[torch.randn(2, 3, 32, 32)]), "num_groups"),  # < top_k
        (lambda m: merge_experts(m, 2, data="images"), "data"),
        (lambda m: merge_experts(m, 2, data=[]), "data"),  # no token routed
        (lambda m: merge_experts(m, 2, usage={"blocks.1.mlp": None}), "usage['blocks.1.mlp']"),
    ],
)
def test_bad_arguments_are_typed_errors_naming_the_argument(call, argument):
    with pytest.raises(mome.InvalidArgumentError) as info:
        call(vmoe())
    assert info.value.argument == argument and info.value.owner in ("prune_experts", "merge_experts", "expert_usage")


def test_keep_out_of_range_names_the_layer():
    with pytest.raises(mome.InvalidArgumentError, match=r"top_k=2, num_experts=4\] for layer 'blocks.1.mlp'"):
        prune_experts(vmoe(), 5, data=[torch.randn(2, 3, 32, 32)])


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: mome.create_model("soft_moe_vit_tiny_patch8_e8"), r"layer 'blocks.2.mlp' \(SoftMoE\).*no token"),
        (lambda: mome.create_model("vmoe_tiny_patch8_e4", moe_type="smear"), r"'blocks.1.mlp' \(SMEAR\)"),
        (lambda: mome.create_model("vlmo_tiny_patch8_32"), r"ModalityRouter.*each modality its own expert"),
        (lambda: SparseMoE(8, 16, 4, 1, router="hash"), r"HashRouter.*fixed"),
        (lambda: SparseMoE(8, 16, 4, router="expert_choice"), r"the model \(ExpertChoiceRouter\).*by design"),
        (lambda: SparseMoE(8, 16, 4, modality_experts=[[0, 1], [2, 3]]), r"per-modality expert pools"),
        (lambda: SparseMoE(8, 16, 4, num_groups=2, max_groups=1), r"device-limited routing"),
        (lambda: nn.Sequential(nn.Linear(4, 4)), r"Sequential has no MoE layer"),
    ],
)
def test_unsupported_layers_and_routers_are_refused_by_name(build, match):
    model = build()
    for call in (lambda: prune_experts(model, 2, data=[]), lambda: merge_experts(model, 2, data=[])):
        with pytest.raises(mome.UnsupportedModelError, match=match):
            call()


def test_per_layer_counts_the_model_args_cannot_express_are_refused_before_any_change():
    model = vmoe()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(mome.UnsupportedModelError, match="give every layer the same count"):
        prune_experts(model, {"blocks.1.mlp": [0, 1, 2], "blocks.3.mlp": [0, 1]}, inplace=True)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    bare = nn.Sequential(SparseMoE(8, 16, 4), SparseMoE(8, 16, 4))  # nothing recorded: any counts
    assert [layer.num_experts for layer in prune_experts(bare, {"0": [0, 1, 2], "1": [1, 3]})] == [3, 2]


def test_fine_grained_counts_must_be_a_multiple_of_the_segments():
    model = mome.create_model("vmoe_tiny_patch8_e4", router="top_k", moe_kwargs={"fine_grained": 2}).eval()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(mome.UnsupportedModelError, match="fine-grained"):
        prune_experts(model, 7, data=[images])
    assert prune_experts(model, 6, data=[images]).mome_model_args["num_experts"] == 3
