"""Router semantics and argument checks."""

import pytest
import torch

from mome.layers import (
    ExpertChoiceRouter,
    HashRouter,
    ModalityRouter,
    NoisyTopKRouter,
    SparseMoE,
    TopKRouter,
    compute_capacity,
    plan_dispatch,
)


def test_top_k_weights_renormalised_or_not():
    tokens = torch.randn(20, 8)
    plain = TopKRouter(8, 4, 2)
    renorm = TopKRouter(8, 4, 2, renormalize=True)
    renorm.load_state_dict(plain.state_dict())
    a, b = plain(tokens), renorm(tokens)
    probs = torch.softmax(tokens @ plain.proj.weight.T, dim=-1)
    expected_w, expected_i = probs.topk(2, dim=-1)
    assert torch.equal(a.expert_index, expected_i)
    torch.testing.assert_close(a.combine_weights, expected_w)
    torch.testing.assert_close(b.combine_weights, expected_w / expected_w.sum(-1, keepdim=True))
    assert (a.combine_weights.sum(-1) < 1).all()


def test_noisy_router_adds_noise_only_in_training():
    router = NoisyTopKRouter(8, 4, 1)
    tokens = torch.randn(200, 8)
    router.train()
    train = router(tokens)
    assert train.selection_probs is not None and train.selection_probs.shape == (200, 4)
    clean_choice = train.router_probs.argmax(-1)
    assert (train.expert_index[:, 0] != clean_choice).any(), "noise with sigma=1/E should flip some choices"
    router.eval()
    evaluation = router(tokens)
    assert evaluation.selection_probs is None
    assert torch.equal(evaluation.expert_index[:, 0], clean_choice)


def test_noise_scale_is_one_over_num_experts():
    router = NoisyTopKRouter(4, 8, 1).train()
    with torch.no_grad():
        router.proj.weight.zero_()  # clean logits 0: the noisy logits are the noise itself
    tokens = torch.randn(4000, 4)
    torch.manual_seed(3)
    routing = router(tokens)
    torch.manual_seed(3)
    noise = torch.randn(4000, 8) / 8  # sigma = noise_std / E = 1/8
    expected = noise.softmax(-1).max(-1).values
    torch.testing.assert_close(routing.combine_weights[:, 0], expected)
    assert torch.equal(routing.expert_index[:, 0], noise.argmax(-1))


def test_expert_choice_balances_load():
    router = ExpertChoiceRouter(8, 4, capacity_factor=1.0)
    routing = router(torch.randn(32, 8))
    assert routing.capacity == 8
    chosen = ~routing.dropped
    assert torch.equal(chosen.sum(0), torch.full((4,), 8))
    # each expert took its most probable tokens
    for e in range(4):
        taken = routing.router_probs[chosen[:, e], e]
        left = routing.router_probs[~chosen[:, e], e]
        assert taken.min() >= left.max()
    moe = SparseMoE(8, 16, 4, router="expert_choice", capacity_factor=1.0)
    out = moe(torch.randn(2, 16, 8))
    assert out.shape == (2, 16, 8)
    torch.testing.assert_close(moe.last_routing_stats["expert_load"], torch.full((4,), 0.25))


def test_hash_router_is_fixed_and_parameter_free():
    router = HashRouter(4, num_buckets=100, seed=1)
    assert not list(router.parameters())
    ids = torch.tensor([3, 7, 3, 99, 7])
    routing = router(torch.randn(5, 8), token_ids=ids)
    assert routing.expert_index[0, 0] == routing.expert_index[2, 0]
    assert routing.expert_index[1, 0] == routing.expert_index[4, 0]
    assert torch.all(routing.combine_weights == 1)
    again = HashRouter(4, num_buckets=100, seed=1)
    assert torch.equal(again.table, router.table)
    assert torch.bincount(router.table, minlength=4).tolist() == [25, 25, 25, 25]
    moe = SparseMoE(8, 16, 4, 1, router="hash")
    assert moe(torch.randn(2, 5, 8)).shape == (2, 5, 8)  # hashes positions when no token ids


def test_modality_router_and_pools():
    router = ModalityRouter(2)
    ids = torch.tensor([0, 1, 1, 0])
    assert router(torch.randn(4, 8), modality_ids=ids).expert_index[:, 0].tolist() == [0, 1, 1, 0]
    pooled = TopKRouter(8, 6, 2, modality_experts=[[0, 1, 2], [3, 4, 5]])
    ids = torch.randint(0, 2, (50,))
    routing = pooled(torch.randn(50, 8), modality_ids=ids)
    image = routing.expert_index[ids == 0]
    text = routing.expert_index[ids == 1]
    assert (image < 3).all() and (text >= 3).all()
    assert torch.all(routing.router_probs[ids == 0][:, 3:] == 0)


def test_compute_capacity_matches_vmoe_rounding():
    # B/16 group of 8 images x 197 tokens, k=2, c=1.05, multiple of 4: ceil(3309.6/8) = 414 -> 416.
    assert compute_capacity(8 * 197 * 2, 8, 1.05, multiple_of=4) == 416
    assert compute_capacity(10, 4, 1.0) == 3
    assert compute_capacity(10, 4, 0.01, min_capacity=2) == 2


@pytest.mark.parametrize(
    "build, word",
    [
        (lambda: TopKRouter(8, 4, 5), "top_k"),
        (lambda: TopKRouter(8, 4, 0), "top_k"),
        (lambda: TopKRouter(8, 4, 1, noise_std=-1.0), "noise_std"),
        (lambda: SparseMoE(8, 16, 4, 5), "top_k"),
        (lambda: SparseMoE(8, 16, 4, 2, capacity_factor=0.0), "capacity_factor"),
        (lambda: SparseMoE(8, 16, 4, 2, capacity_factor=-1.0), "capacity_factor"),
        (lambda: SparseMoE(8, 16, 4, 2, eval_capacity_factor=0), "eval_capacity_factor"),
        (lambda: SparseMoE(8, 16, 4, 2, dispatch="buffers"), "capacity_factor"),
        (lambda: SparseMoE(8, 16, 4, 2, dispatch="loop"), "dispatch"),
        (lambda: SparseMoE(8, 16, 0, 1), "num_experts"),
        (lambda: SparseMoE(8, 16, 4, 1, router="nope"), "router"),
        (lambda: TopKRouter(8, 4, 2, modality_experts=[[0], [1, 2]]), "modality_experts"),
        (lambda: TopKRouter(8, 4, 1, modality_experts=[[0, 9]]), "modality_experts"),
        (lambda: ExpertChoiceRouter(8, 4, capacity_factor=0), "capacity_factor"),
        (lambda: compute_capacity(8, 4, 0.0), "capacity_factor"),
        (lambda: SparseMoE(8, 16, 4, router="expert_choice", aux_loss_weights={"load_balance": 0.01}), "load_balance"),
    ],
)
def test_bad_arguments_name_the_argument(build, word):
    with pytest.raises(ValueError, match=word):
        build()


def test_mismatched_modality_ids_are_rejected():
    moe = SparseMoE(8, 16, 4, 1, num_modalities=2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="modality_ids"):
        moe(x, modality_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="modality_ids"):
        moe(x, modality_ids=torch.full((2, 5), 2))
    with pytest.raises(ValueError, match="modality_ids"):
        moe(x, modality_ids=torch.zeros(2, 5))
    pooled = SparseMoE(8, 16, 4, 1, modality_experts=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="modality_ids"):
        pooled(x)


def test_plan_is_consistent_with_capacity():
    router = TopKRouter(8, 4, 2)
    routing, plan = plan_dispatch(router(torch.randn(30, 8)), capacity=5)
    assert int(plan.group_sizes.sum()) == int((~routing.dropped).sum())
    assert plan.group_sizes.max() <= 5
    expert = routing.expert_index.reshape(-1)
    assert torch.equal(plan.slot[plan.kept] // 5, expert[plan.kept])  # kept: a slot in its expert's buffer
    assert torch.all(plan.slot[~plan.kept] == 4 * 5)  # dropped: the sink row
    assert len(set(plan.slot[plan.kept].tolist())) == int(plan.kept.sum())  # no two share a slot
