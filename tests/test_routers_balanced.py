"""BASE layers' balanced assignment, S-BASE's Sinkhorn routing and X-MoE's cosine routing: each router's defining
property, a hand-computed case, the dispatch paths against a naive reference, torch.compile, and the names and
recipes that build them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import naive_moe
from test_dispatch_compile import TOL, fwd_bwd

import mome
from mome._errors import InvalidArgumentError, InvalidInputError, UnsupportedOptionError
from mome.layers import (
    BaseLayerRouter,
    Experts,
    SinkhornRouter,
    SparseMoE,
    TopKRouter,
    XMoERouter,
    balanced_assignment,
    plan_dispatch,
    sinkhorn_balance,
)
from mome.layers.routers import noncausal_reason

ROUTERS = {
    "base": lambda dim, e: BaseLayerRouter(dim, e),
    "sinkhorn": lambda dim, e: SinkhornRouter(dim, e, 2, sinkhorn_iters=4, renormalize=True),
    "xmoe": lambda dim, e: XMoERouter(dim, e, 2, routing_dim=8),
}


def _loads(expert: torch.Tensor, num_experts: int) -> list[int]:
    return torch.bincount(expert.reshape(-1), minlength=num_experts).tolist()


# -- BASE ---------------------------------------------------------------------------------------------------
def test_balanced_assignment_hand_computed():
    # Greedy puts tokens 0, 1, 3 on expert 0; with 2 tokens each, expert 0 takes the two with the largest
    # s0 - s1 (2, 2, -1, 1): tokens 0 and 1, total 3 + 2 + 1 + 0 = 6.
    scores = torch.tensor([[3.0, 1.0], [2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert balanced_assignment(scores).tolist() == [0, 0, 1, 1]
    # T = 3, E = 2: one expert takes 2 tokens, the other 1: tokens 0, 1 on expert 0, token 2 on 1 (3 + 2 + 1 = 6).
    assert balanced_assignment(scores[:3]).tolist() == [0, 0, 1]


def _optimum(scores: np.ndarray) -> float:
    """The best total over balanced assignments by scipy's linear_sum_assignment: ``q + 1`` slots per expert and
    ``E - r`` dummy rows that may only fill an expert's last slot (so exactly ``r`` experts take ``q + 1``)."""
    linear_sum_assignment = pytest.importorskip("scipy.optimize").linear_sum_assignment
    num_tokens, num_experts = scores.shape
    base, extra = divmod(num_tokens, num_experts)
    slots = np.repeat(scores, base + 1, axis=1)
    dummies = np.full((num_experts - extra, slots.shape[1]), -1e9)
    dummies[:, base :: base + 1] = 0.0
    rows, cols = linear_sum_assignment(np.vstack([slots, dummies]), maximize=True)
    real = rows < num_tokens
    return float(scores[rows[real], cols[real] // (base + 1)].sum())


def test_balanced_assignment_is_balanced_and_optimal():
    rng = np.random.default_rng(0)
    for trial in range(60):
        num_experts, num_tokens = int(rng.integers(1, 6)), int(rng.integers(1, 26))
        scores = rng.standard_normal((num_tokens, num_experts))
        scores[:, 0] += 2.0 * (trial % 2)  # skewed: greedy would overload expert 0
        if trial % 3 == 0:
            scores = np.round(scores)  # ties
        expert = balanced_assignment(torch.from_numpy(scores))
        base, extra = divmod(num_tokens, num_experts)
        assert sorted(_loads(expert, num_experts)) == [base] * (num_experts - extra) + [base + 1] * extra
        total = float(scores[np.arange(num_tokens), expert.numpy()].sum())
        assert total == pytest.approx(_optimum(scores), abs=1e-9), (num_tokens, num_experts)


def test_balanced_assignment_refuses_bad_scores():
    with pytest.raises(InvalidInputError, match="scores"):
        balanced_assignment(torch.ones(4))
    with pytest.raises(InvalidInputError, match="finite"):
        balanced_assignment(torch.tensor([[0.0, float("nan")]]))


@pytest.mark.parametrize("num_tokens", [32, 30])
def test_base_router_balances_at_training_and_is_greedy_at_evaluation(num_tokens):
    torch.manual_seed(0)
    router = BaseLayerRouter(16, 4)
    x = torch.randn(num_tokens, 16) + 3 * router.proj.weight[0] / router.proj.weight[0].norm()  # skewed to expert 0
    routing = router.train()(x)
    loads = _loads(routing.expert_index, 4)
    assert max(loads) - min(loads) == (0 if num_tokens % 4 == 0 else 1), loads
    logits = x @ router.proj.weight.T
    torch.testing.assert_close(routing.combine_weights[:, 0], logits.gather(1, routing.expert_index)[:, 0].sigmoid())
    evaluated = router.eval()(x)
    assert torch.equal(evaluated.expert_index[:, 0], logits.argmax(-1))
    assert max(_loads(evaluated.expert_index, 4)) > num_tokens // 2  # the greedy choice is what BASE balances
    evaluated.combine_weights.sum().backward()
    assert router.proj.weight.grad.abs().sum() > 0  # the sigmoid weight trains the expert embeddings


# -- Sinkhorn / S-BASE --------------------------------------------------------------------------------------
def test_sinkhorn_balance_marginals():
    logits = torch.randn(12, 3) + torch.tensor([3.0, 0.0, -1.0])
    balanced = sinkhorn_balance(logits, 50)
    torch.testing.assert_close(balanced.sum(1), torch.full((12,), 1 / 12))
    torch.testing.assert_close(balanced.sum(0), torch.full((3,), 1 / 3), atol=1e-5, rtol=0)
    # One iteration by hand: columns to 1/E, then rows to 1/T.
    p = logits.exp()
    p = p / p.sum(0) / 3
    p = p / p.sum(1, keepdim=True) / 12
    torch.testing.assert_close(sinkhorn_balance(logits, 1), p)


def test_sinkhorn_router_balances_a_skewed_router():
    torch.manual_seed(0)
    num_tokens, num_experts = 512, 4
    router = SinkhornRouter(16, num_experts, 1, sinkhorn_iters=50)
    with torch.no_grad():
        router.proj.weight.mul_(3.0)
        router.proj.weight[0] += 1.5  # every token prefers expert 0
    x = torch.randn(num_tokens, 16) + 1.0
    plain = router.eval()(x)
    assert max(_loads(plain.expert_index, num_experts)) > 0.75 * num_tokens
    routing = router.train()(x)
    loads = _loads(routing.expert_index, num_experts)
    assert max(loads) <= 1.1 * num_tokens / num_experts and min(loads) >= 0.9 * num_tokens / num_experts, loads
    # Weights from the original softmax, and their gradient too (none through the balancing).
    probs = (x @ router.proj.weight.T).softmax(-1)
    torch.testing.assert_close(routing.combine_weights, probs.gather(1, routing.expert_index))
    (grad,) = torch.autograd.grad(routing.combine_weights.sum(), router.proj.weight)
    (want,) = torch.autograd.grad(
        (x @ router.proj.weight.T).softmax(-1).gather(1, routing.expert_index).sum(), router.proj.weight
    )
    torch.testing.assert_close(grad, want)


# -- X-MoE --------------------------------------------------------------------------------------------------
def test_xmoe_scores_hand_computed_and_bounded():
    router = XMoERouter(3, 2, 1, routing_dim=2, temperature=0.5)
    with torch.no_grad():
        router.proj.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        router.expert_embeddings.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    x = torch.tensor([[3.0, 4.0, 7.0]])  # projected (3, 4): cosines 3/5 and 7/(5 sqrt 2)
    routing = router(x)
    expected = torch.tensor([[0.6, 7 / (5 * math.sqrt(2))]]) / 0.5
    torch.testing.assert_close(routing.router_logits, expected)
    assert routing.expert_index.tolist() == [[1]]
    torch.testing.assert_close(routing.combine_weights, expected.softmax(-1)[:, 1:])
    big = XMoERouter(32, 8, 2)
    assert big.proj.out_features == 16 and big.temperature.item() == pytest.approx(0.07)
    scores = big(torch.randn(64, 32) * 10).router_logits
    assert scores.abs().max() <= 1 / 0.07 + 1e-4
    with torch.no_grad():
        big.temperature.fill_(1e-9)  # clamped at min_temperature
    assert big(torch.randn(64, 32)).router_logits.abs().max() <= 1 / big.min_temperature * (1 + 1e-5)


# -- the three through the MoE machinery -------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ROUTERS))
@pytest.mark.parametrize("capacity", [None, 5])
def test_dispatch_paths_match_naive_reference(name, capacity):
    torch.manual_seed(3)
    experts = Experts(4, 16, 32)
    router = ROUTERS[name](16, 4).train()
    tokens = torch.randn(14, 16, requires_grad=True)
    routing = router(tokens)
    outs = {}
    for dispatch in ("sorted", "buffers"):
        if dispatch == "buffers" and capacity is None:
            continue
        planned, plan = plan_dispatch(routing, capacity)
        outs[dispatch] = experts(tokens, planned, plan, dispatch)
    planned, _ = plan_dispatch(routing, capacity)
    reference = naive_moe(experts, tokens, planned.expert_index, planned.combine_weights, planned.dropped)
    params = [tokens, *experts.parameters(), *router.parameters()]
    want = torch.autograd.grad(reference.square().sum(), params, retain_graph=True, allow_unused=True)
    for dispatch, out in outs.items():
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
        got = torch.autograd.grad(out.square().sum(), params, retain_graph=True, allow_unused=True)
        for g, w in zip(got, want):
            assert (g is None) == (w is None), dispatch
            if g is not None:
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_sparse_moe_by_name_compiles_fullgraph_and_matches_eager(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = SparseMoE(16, 32, 4, 1 if name == "base" else 2, router=name, capacity_factor=2.0).train()
    x = torch.randn(2, 8, 16)
    eager = fwd_bwd(layer, x, ())
    compiled = fwd_bwd(torch.compile(layer, fullgraph=True, backend="aot_eager"), x, ())
    torch.testing.assert_close(compiled[0], eager[0], **TOL)
    torch.testing.assert_close(compiled[1], eager[1], **TOL)
    for got, expected in zip(compiled[2], eager[2]):
        torch.testing.assert_close(got, expected, **TOL)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_in_a_vmoe_model_forward_backward(name):
    torch.manual_seed(0)
    model = mome.create_model("vmoe_tiny_patch8_e4", router=name, top_k=1, moe_kwargs={"capacity_factor": None})
    model.train()
    loss = model(torch.randn(2, 3, 32, 32)).square().mean() + sum(mome.aux_losses(model).values())
    loss.backward()
    routers = [m.router for m in model.modules() if hasattr(m, "router")]
    assert routers and all(any(p.grad is not None for p in r.parameters()) for r in routers)
    stats = mome.routing_stats(model)
    assert stats
    if name == "base":  # 2 images x 17 tokens (16 patches + cls) = 34 tokens, E = 4: loads 8 or 9
        for layer_stats in stats.values():
            assert sorted((layer_stats["expert_load"] * 34).round().tolist()) == [8.0, 8.0, 9.0, 9.0]


def test_names_options_and_typed_errors():
    layer = SparseMoE(8, 16, 4, 2, router="sinkhorn", router_options={"sinkhorn_iters": 3, "renormalize": True})
    assert isinstance(layer.router, SinkhornRouter) and layer.router.sinkhorn_iters == 3
    assert isinstance(SparseMoE(8, 16, 4, 1, router="xmoe").router, XMoERouter)
    assert isinstance(SparseMoE(8, 16, 4, 1, router="base").router, BaseLayerRouter)
    with pytest.raises(InvalidArgumentError, match="top_k"):
        SparseMoE(8, 16, 4, 2, router="base")
    with pytest.raises(UnsupportedOptionError, match="router_options"):
        SparseMoE(8, 16, 4, 2, router="top_k", router_options={"sinkhorn_iters": 3})
    with pytest.raises(InvalidArgumentError, match="router_options"):
        SparseMoE(8, 16, 4, 2, router="xmoe", router_options={"sinkhorn_iters": 3})
    with pytest.raises(InvalidArgumentError, match="sinkhorn_iters"):
        SinkhornRouter(8, 4, sinkhorn_iters=0)
    with pytest.raises(InvalidArgumentError, match="top_k"):
        SinkhornRouter(8, 4, top_k=5)
    with pytest.raises(InvalidArgumentError, match="routing_dim"):
        XMoERouter(8, 4, routing_dim=0)
    with pytest.raises(InvalidArgumentError, match="temperature"):
        XMoERouter(8, 4, temperature=1e-6)
    with pytest.raises(InvalidArgumentError, match="min_temperature"):
        XMoERouter(8, 4, min_temperature=0.0)
    with pytest.raises(InvalidArgumentError, match="num_experts"):
        BaseLayerRouter(8, 0)
    # Balanced routing looks across the sequence (causal LMs refuse it); X-MoE's choice is per token.
    assert noncausal_reason(BaseLayerRouter(8, 4)) and noncausal_reason(SinkhornRouter(8, 4))
    assert noncausal_reason(XMoERouter(8, 4)) is None and noncausal_reason(TopKRouter(8, 4)) is None
