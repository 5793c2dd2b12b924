"""Every dispatch path against a naive per-token reference, forward and backward."""

import pytest
import torch
from reference import naive_moe

from mome.layers import Experts, SparseMoE, TopKRouter, plan_dispatch


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


# ------------------------------------------------------------------ the per-expert loop (CPU, many rows per expert)
LOOP_CASES = [
    # experts, k, capacity, gated, bias, frozen experts
    (4, 2, None, False, True, False),
    (4, 1, None, True, False, False),
    (4, 2, 3, True, True, False),  # capacity: dropped rows computed by the last expert and weighted 0
    (16, 1, None, False, True, False),  # 13 tokens over 16 experts: some get no row
    (4, 2, None, True, True, True),  # frozen experts: only the tokens and the router get gradients
]


@pytest.mark.parametrize("num_experts,k,capacity,gated,bias,frozen", LOOP_CASES)
def test_per_expert_loop_matches_grouped_matmul_and_naive_reference(
    num_experts, k, capacity, gated, bias, frozen, monkeypatch
):
    from mome.layers import experts as experts_module

    torch.manual_seed(3)
    act = torch.nn.SiLU if gated else torch.nn.GELU
    experts = Experts(num_experts, 16, 32, gated=gated, bias=bias, act_layer=act).requires_grad_(not frozen)
    router = TopKRouter(16, num_experts, k)
    tokens = torch.randn(13, 16, requires_grad=True)
    params = [tokens, router.proj.weight] + ([] if frozen else list(experts.parameters()))
    upstream = torch.randn(13, 16, generator=torch.Generator().manual_seed(7))

    taken = []
    loop = experts_module._PerExpertFFN.apply
    monkeypatch.setattr(experts_module._PerExpertFFN, "apply", lambda *a: taken.append(1) or loop(*a))
    results = {}
    for name, min_rows in (("grouped", 10**9), ("loop", 0)):
        monkeypatch.setattr(experts_module, "PER_EXPERT_MIN_ROWS", min_rows)
        out, routing = run_path(experts, router, tokens, capacity, "sorted")
        results[name] = (out, grads((out * upstream).sum(), params))
        assert bool(taken) == (name == "loop"), f"{name}: per-expert loop taken={bool(taken)}"

    routing, _ = plan_dispatch(router(tokens), capacity)  # a fresh graph for the reference
    reference = naive_moe(experts, tokens, routing.expert_index, routing.combine_weights, routing.dropped)
    reference_grads = grads((reference * upstream).sum(), params)
    if num_experts == 16:
        assert (torch.bincount(routing.expert_index.flatten(), minlength=16) == 0).any(), "test setup: an idle expert"
    names = ["tokens", "router", "w_in", "w_out", "b_in", "b_out"]
    for path, (out, path_grads) in results.items():
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5, msg=f"{path} forward")
        for name, got, want in zip(names, path_grads, reference_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{path}: grad of {name}")
    # The two computations run the same matmuls per expert: equal, not only close.
    assert torch.equal(results["loop"][0], results["grouped"][0])


def test_per_expert_loop_gradients_come_in_the_parameter_layout(monkeypatch):
    from mome.layers import experts as experts_module

    monkeypatch.setattr(experts_module, "PER_EXPERT_MIN_ROWS", 0)
    torch.manual_seed(0)
    experts, router = Experts(4, 16, 32), TopKRouter(16, 4, 2)
    out, _ = run_path(experts, router, torch.randn(24, 16), None, "sorted")
    out.sum().backward()
    for name in ("w_in", "w_out", "b_in", "b_out"):
        grad = getattr(experts, name).grad
        assert grad is not None and grad.is_contiguous(), name


def test_the_per_expert_loop_is_chosen_by_shape_and_device_only():
    from mome.layers.experts import PER_EXPERT_MIN_ROWS, use_per_expert_loop

    many = torch.zeros(PER_EXPERT_MIN_ROWS * 8, 16)
    assert use_per_expert_loop(len(many), 8, many)
    assert not use_per_expert_loop(len(many) - 1, 8, many)
    assert not use_per_expert_loop(len(many), 8, many.to("meta"))  # an accelerator: grouped matmul
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_per_expert_loop(len(many), 8, many)


def test_the_dispatch_reads_the_expert_weights_once(monkeypatch):
    """A LoRA-adapted or quantized layer builds its weights per call (``dense_weights``): the sorted dispatch asks once,
    whichever computation it takes."""
    from mome.layers import experts as experts_module

    torch.manual_seed(0)
    experts, router = Experts(4, 16, 32), TopKRouter(16, 4, 2)
    calls = []
    build = Experts.dense_weights
    monkeypatch.setattr(Experts, "dense_weights", lambda self: calls.append(1) or build(self))
    for min_rows in (0, 10**9):
        monkeypatch.setattr(experts_module, "PER_EXPERT_MIN_ROWS", min_rows)
        calls.clear()
        run_path(experts, router, torch.randn(24, 16), None, "sorted")
        assert calls == [1], f"PER_EXPERT_MIN_ROWS={min_rows}: dense_weights called {len(calls)} times"


# ------------------------------------------------------------------ the few-token path (CPU inference, decoding)
FEW_CASES = [
    # experts, k, tokens, gated, bias, dispatch dtype
    (4, 2, 1, False, True, None),
    (4, 2, 4, True, False, None),
    (8, 1, 3, False, True, None),
    (4, 2, 2, True, True, "bfloat16"),
    (4, 2, 1, False, False, "bfloat16"),
]


@pytest.mark.parametrize("num_experts,k,num_tokens,gated,bias,dispatch_dtype", FEW_CASES)
def test_few_token_path_matches_the_sorted_path_and_naive_reference(
    num_experts, k, num_tokens, gated, bias, dispatch_dtype, monkeypatch
):
    from mome.layers import SparseMoE
    from mome.layers import experts as experts_module

    torch.manual_seed(4)
    act = torch.nn.SiLU if gated else torch.nn.GELU
    layer = SparseMoE(
        16, 32, num_experts, k, gated=gated, bias=bias, act_layer=act, renormalize=gated, dispatch_dtype=dispatch_dtype
    ).eval()
    x = torch.randn(1, num_tokens, 16)
    taken = []
    few = experts_module.Experts.forward_few
    monkeypatch.setattr(experts_module.Experts, "forward_few", lambda *a: taken.append(1) or few(*a))
    with torch.no_grad():
        out_few = layer(x)
        assert taken, "the few-token path was not taken"
        monkeypatch.setattr(experts_module, "FEW_TOKEN_ROWS", 0)
        out_sorted = layer(x)
        assert len(taken) == 1
        routing = layer.router(x.reshape(-1, 16))
    torch.testing.assert_close(out_few, out_sorted, atol=1e-6, rtol=1e-5)
    if dispatch_dtype is None:
        reference = naive_moe(layer.experts, x[0], routing.expert_index, routing.combine_weights, routing.dropped)
        torch.testing.assert_close(out_few[0], reference, atol=1e-5, rtol=1e-5)


def test_few_token_path_weighs_declined_assignments_zero():
    """An assignment the routing declines is computed but weighted 0, as the sorted path does."""
    from dataclasses import replace

    from mome.layers import weigh_kept

    torch.manual_seed(0)
    experts, router = Experts(4, 16, 32), TopKRouter(16, 4, 2, renormalize=True)
    tokens = torch.randn(3, 16)
    with torch.no_grad():
        routing = replace(router(tokens), dropped=torch.tensor([[False, True], [False, False], [True, False]]))
        few = experts.forward_few(tokens, weigh_kept(routing, routing.dropped))
        planned, plan = plan_dispatch(routing, None)
        torch.testing.assert_close(few, experts(tokens, planned, plan, "sorted"), atol=1e-6, rtol=1e-5)
        assert planned.combine_weights[0, 1] == 0 and planned.combine_weights[2, 0] == 0


def test_the_few_token_path_is_chosen_by_shape_device_and_grad_mode():
    from mome.layers.experts import FEW_TOKEN_ROWS, use_few_token_path
    from mome.layers.routers import Routing

    def routing(rows, device="cpu"):
        index = torch.zeros(rows, 1, dtype=torch.long, device=device)
        return Routing(index, index.float(), index.bool(), torch.ones(rows, 4, device=device))

    tokens = torch.zeros(FEW_TOKEN_ROWS, 16)
    with torch.no_grad():
        assert use_few_token_path(tokens, routing(FEW_TOKEN_ROWS))
        assert not use_few_token_path(tokens, routing(FEW_TOKEN_ROWS + 1))
        assert not use_few_token_path(tokens[:0], routing(0)), "no tokens: the sorted path's empty output"
        assert not use_few_token_path(tokens.to("meta"), routing(1, "meta"))
    assert not use_few_token_path(tokens, routing(1)), "with autograd on, the sorted path trains"


def test_few_token_path_keeps_capacity_semantics(monkeypatch):
    """With a capacity that one token cannot exceed the few-token path serves the layer; with more tokens than the
    capacity (drops possible) the sorted path does."""
    from mome.layers import SparseMoE
    from mome.layers import experts as experts_module

    taken = []
    few = experts_module.Experts.forward_few
    monkeypatch.setattr(experts_module.Experts, "forward_few", lambda *a: taken.append(1) or few(*a))
    layer = SparseMoE(16, 32, 4, 2, capacity_factor=0.5, eval_capacity_factor="train").eval()
    with torch.no_grad():
        layer(torch.randn(1, 1, 16))  # capacity ceil(2 * 0.5 / 4) = 1 >= 1 token
        assert taken == [1]
        layer(torch.randn(1, 4, 16))  # capacity 1 < 4 tokens: drops are possible
        assert taken == [1]


@pytest.mark.parametrize("gated,bias", [(False, True), (True, False)])
def test_per_expert_loop_on_sorted_rows_matches_the_grouped_matmul(gated, bias, monkeypatch):
    """``forward_grouped`` (rows already sorted by expert: the expert-parallel exchange and the bf16 dispatch take it)
    computes the same with the per-expert loop, forward and backward, empty experts included."""
    from mome.layers import experts as experts_module

    torch.manual_seed(6)
    act = torch.nn.SiLU if gated else torch.nn.GELU
    experts = Experts(4, 16, 32, gated=gated, bias=bias, act_layer=act)
    group_sizes = torch.tensor([5, 0, 7, 3])
    rows = torch.randn(15, 16)
    upstream = torch.randn(15, 16)
    results = {}
    for path, min_rows in (("grouped", 10**9), ("loop", 0)):
        monkeypatch.setattr(experts_module, "PER_EXPERT_MIN_ROWS", min_rows)
        inputs = rows.clone().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        (experts.forward_grouped(inputs, group_sizes) * upstream).sum().backward()
        results[path] = [inputs.grad] + [p.grad for p in experts.parameters()]
        results[path].append(experts.forward_grouped(rows, group_sizes).detach())
    for got, want in zip(results["loop"], results["grouped"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert results["loop"][1][1].abs().sum() == 0, "an expert without rows gets a zero weight gradient"


def test_bf16_dispatch_takes_the_per_expert_loop_on_sorted_rows(monkeypatch):
    """With ``dispatch_dtype`` the rows are rounded before the experts: the loop then runs on the sorted rows, and the
    layer equals its grouped-matmul computation."""
    from mome.layers import experts as experts_module

    torch.manual_seed(7)
    layer = SparseMoE(16, 32, 4, 2, dispatch_dtype="bfloat16")
    x = torch.randn(2, 8, 16)
    outputs = {}
    for path, min_rows in (("grouped", 10**9), ("loop", 0)):
        monkeypatch.setattr(experts_module, "PER_EXPERT_MIN_ROWS", min_rows)
        outputs[path] = layer(x)
    torch.testing.assert_close(outputs["loop"], outputs["grouped"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_per_expert_loop_in_inference_matches_the_grouped_matmul(gated, monkeypatch):
    """Without autograd the per-expert loop keeps no buffers (temporaries per expert): the same outputs."""
    from mome.layers import experts as experts_module

    torch.manual_seed(8)
    act = torch.nn.SiLU if gated else torch.nn.GELU
    layer = SparseMoE(16, 32, 4, 2, gated=gated, act_layer=act).eval()
    x = torch.randn(2, 12, 16)
    outputs = {}
    with torch.no_grad():
        for path, min_rows in (("grouped", 10**9), ("loop", 0)):
            monkeypatch.setattr(experts_module, "PER_EXPERT_MIN_ROWS", min_rows)
            outputs[path] = layer(x)
            outputs[path + " rows"] = layer.experts.forward_grouped(x[0, :10], torch.tensor([4, 0, 3, 3]))
    torch.testing.assert_close(outputs["loop"], outputs["grouped"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["loop rows"], outputs["grouped rows"], atol=1e-5, rtol=1e-5)
