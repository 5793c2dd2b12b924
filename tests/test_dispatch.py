"""Every dispatch path against a naive per-token reference, forward and backward."""

import pytest
import torch
from reference import naive_moe

from mome.layers import Experts, TopKRouter, plan_dispatch


def naive_capacity_drops(expert_index, priority, capacity, num_experts):
    """V-MoE's rule written as a loop: first choices before second ones, tokens in priority order."""
    num_tokens, top_k = expert_index.shape
    order = (
        range(num_tokens) if priority is None else sorted(range(num_tokens), key=lambda t: -float(priority[t].detach()))
    )
    used = [0] * num_experts
    dropped = torch.zeros(num_tokens, top_k, dtype=torch.bool)
    for j in range(top_k):
        for t in order:
            e = int(expert_index[t, j])
            if capacity is not None and used[e] >= capacity:
                dropped[t, j] = True
            else:
                used[e] += 1
    return dropped


def run_path(experts, router, tokens, capacity, dispatch):
    routing, plan = plan_dispatch(router(tokens), capacity)
    return experts(tokens, routing, plan, dispatch), routing


def grads(outputs, params):
    return torch.autograd.grad(outputs, params)


CASES = [
    # dim, hidden, experts, k, capacity, gated, bias
    (16, 32, 4, 1, None, False, True),
    (16, 32, 4, 2, None, False, True),
    (16, 32, 4, 1, 3, False, True),
    (16, 32, 4, 2, 3, True, False),
    (16, 32, 8, 2, 1, False, True),  # tiny capacity: some tokens get no expert at all
    (6, 10, 3, 2, 4, True, True),  # widths grouped_mm cannot take: fallback path
]


@pytest.mark.parametrize("dim,hidden,num_experts,k,capacity,gated,bias", CASES)
def test_paths_match_naive_reference(dim, hidden, num_experts, k, capacity, gated, bias):
    torch.manual_seed(1)
    experts = Experts(
        num_experts, dim, hidden, gated=gated, bias=bias, act_layer=torch.nn.SiLU if gated else torch.nn.GELU
    )
    router = TopKRouter(dim, num_experts, k)
    tokens = torch.randn(13, dim, requires_grad=True)
    params = [tokens, router.proj.weight, *experts.parameters()]

    results = {}
    for dispatch in ("sorted", "buffers"):
        if dispatch == "buffers" and capacity is None:
            continue
        out, routing = run_path(experts, router, tokens, capacity, dispatch)
        upstream = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
        results[dispatch] = (out, grads((out * upstream).sum(), params))

    routing = router(tokens)
    expected_dropped = naive_capacity_drops(routing.expert_index, None, capacity, num_experts)
    weights = routing.combine_weights.masked_fill(expected_dropped, 0.0)
    reference = naive_moe(experts, tokens, routing.expert_index, weights, expected_dropped)
    upstream = torch.randn_like(reference, generator=torch.Generator().manual_seed(7))
    reference_grads = grads((reference * upstream).sum(), params)

    if capacity == 1:
        assert expected_dropped.all(dim=1).any(), "test setup: expected a token routed to no expert"
    for dispatch, (out, path_grads) in results.items():
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5, msg=f"{dispatch} forward")
        for param, got, want in zip(
            ["tokens", "router", "w_in", "w_out", "b_in", "b_out"], path_grads, reference_grads
        ):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{dispatch} grad of {param}")


@pytest.mark.parametrize("batch_priority", [False, True])
def test_capacity_drops_follow_priority(batch_priority):
    torch.manual_seed(2)
    router = TopKRouter(8, 4, 2, batch_priority=batch_priority)
    tokens = torch.randn(40, 8) * 3
    routing = router(tokens)
    routed, plan = plan_dispatch(routing, capacity=6)
    expected = naive_capacity_drops(routing.expert_index, routing.priority, 6, 4)
    assert torch.equal(routed.dropped, expected)
    assert routed.dropped.any()
    assert torch.all(routed.combine_weights[routed.dropped] == 0)
    counts = torch.bincount(routing.expert_index[~routed.dropped], minlength=4)
    assert counts.max() <= 6
    assert torch.equal(plan.group_sizes, counts)
    if batch_priority:
        # For each expert, every first-choice token it dropped has a lower top-1 weight than
        # every first-choice token it kept.
        top1 = routing.expert_index[:, 0]
        for e in range(4):
            kept = routing.priority[(top1 == e) & ~routed.dropped[:, 0]]
            lost = routing.priority[(top1 == e) & routed.dropped[:, 0]]
            if len(kept) and len(lost):
                assert lost.max() <= kept.min()
    else:
        # Without BPR, an expert drops the later tokens of a choice rank.
        top1 = routing.expert_index[:, 0]
        for e in range(4):
            positions = torch.nonzero(top1 == e).flatten()
            lost = routed.dropped[positions, 0]
            if lost.any():
                first_lost = int(torch.nonzero(lost)[0])
                assert lost[first_lost:].all()


def test_dropless_drops_nothing_and_empty_experts_are_fine():
    experts = Experts(8, 16, 32)
    router = TopKRouter(16, 8, 2)
    with torch.no_grad():
        router.proj.weight.zero_()
        router.proj.weight[0] = 1.0  # every token prefers experts 0 (and the tie-broken next)
    tokens = torch.rand(9, 16, requires_grad=True)
    routing, plan = plan_dispatch(router(tokens), None)
    assert not routing.dropped.any()
    assert int(plan.group_sizes.sum()) == 18 and (plan.group_sizes == 0).sum() >= 5
    out = experts(tokens, routing, plan)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(tokens.grad).all()
    assert torch.isfinite(experts.w_in.grad).all()


@pytest.mark.parametrize("router_name", ["expert_choice", "noisy_bpr"])
def test_other_routers_through_both_paths(router_name):
    from mome.layers import ExpertChoiceRouter, NoisyTopKRouter

    torch.manual_seed(4)
    experts = Experts(4, 16, 32)
    if router_name == "expert_choice":
        router = ExpertChoiceRouter(16, 4, capacity_factor=0.75)
        capacity = None  # the router fixes it
    else:
        router = NoisyTopKRouter(16, 4, 2, batch_priority=True).eval()
        capacity = 4
    tokens = torch.randn(12, 16, requires_grad=True)
    routing, plan = plan_dispatch(router(tokens), capacity)
    outs = [experts(tokens, routing, plan, dispatch) for dispatch in ("sorted", "buffers")]
    reference = naive_moe(experts, tokens, routing.expert_index, routing.combine_weights, routing.dropped)
    for out in outs:
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(out.square().sum(), [tokens, experts.w_in], retain_graph=True) for out in outs]
    want = torch.autograd.grad(reference.square().sum(), [tokens, experts.w_in])
    for got in grads:
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_priority", [False, True])
def test_token_groups_apply_capacity_per_group(batch_priority):
    torch.manual_seed(5)
    num_groups, group_length, num_experts, capacity = 3, 10, 4, 3
    experts = Experts(num_experts, 16, 32)
    router = TopKRouter(16, num_experts, 2, batch_priority=batch_priority)
    tokens = torch.randn(num_groups * group_length, 16, requires_grad=True)
    routing = router(tokens)
    routed, plan = plan_dispatch(routing, capacity, num_groups=num_groups)
    # Reference: each group is routed on its own, as V-MoE vmaps the dispatcher over groups.
    expected = torch.cat(
        [
            naive_capacity_drops(
                routing.expert_index[g * group_length : (g + 1) * group_length],
                None if routing.priority is None else routing.priority[g * group_length : (g + 1) * group_length],
                capacity,
                num_experts,
            )
            for g in range(num_groups)
        ]
    )
    assert torch.equal(routed.dropped, expected)
    whole_batch, _ = plan_dispatch(routing, capacity * num_groups)
    assert not torch.equal(whole_batch.dropped, routed.dropped), "test setup: grouping should change the drops"
    weights = routing.combine_weights.masked_fill(expected, 0.0)
    reference = naive_moe(experts, tokens, routing.expert_index, weights, expected)
    for dispatch in ("sorted", "buffers"):
        out = experts(tokens, routed, plan, dispatch)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5, msg=dispatch)
        got = torch.autograd.grad(out.square().sum(), [tokens, experts.w_out], retain_graph=True)
        want = torch.autograd.grad(reference.square().sum(), [tokens, experts.w_out], retain_graph=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_grouped_moe_losses_are_means_over_groups():
    from mome.layers import SparseMoE
    from mome.layers import losses as L

    layer = SparseMoE(8, 16, 4, 2, group_size=6, capacity_factor=1.0, aux_loss_weights={"importance": 1.0})
    x = torch.randn(2, 6, 8)  # 12 tokens = 2 groups of 6
    layer(x)
    logits = x.reshape(-1, 8) @ layer.router.proj.weight.T
    probs = logits.softmax(-1)
    expected = (L.importance_loss(probs[:6]) + L.importance_loss(probs[6:])) / 2
    torch.testing.assert_close(layer.last_aux_losses["importance"], expected)
    assert not torch.allclose(expected, L.importance_loss(probs))
    with pytest.raises(ValueError, match="group_size"):
        layer(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="group_size"):
        SparseMoE(8, 16, 4, 2, group_size=0)


@pytest.mark.parametrize("dispatch", ["sorted", "buffers"])
def test_expert_weight_gradients_come_in_the_parameter_layout(dispatch):
    """The gradients of the stacked weights are made contiguous ``[E, out, in]`` by the matmul's backward
    (a transposed gradient costs a strided copy of the whole expert tensor at accumulation)."""
    torch.manual_seed(0)
    experts, router = Experts(4, 16, 32, dispatch=dispatch), TopKRouter(16, 4, 2)
    tokens = torch.randn(24, 16)
    captured = {}
    for name, param in (("w_in", experts.w_in), ("w_out", experts.w_out)):
        param.register_hook(lambda grad, name=name: captured.__setitem__(name, grad))
    out, _ = run_path(experts, router, tokens, 8, dispatch)
    out.sum().backward()
    for name, grad in captured.items():
        assert grad.is_contiguous(), f"{dispatch}: dL/d{name} has strides {grad.stride()}"
    assert set(captured) == {"w_in", "w_out"}
