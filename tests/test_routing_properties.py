"""Property-based checks of routing + dispatch over random shapes, k, capacity and modalities."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mome.layers import Experts, TopKRouter, plan_dispatch


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(1, 40),
    num_experts=st.integers(1, 6),
    data=st.data(),
)
def test_routing_invariants(num_tokens, num_experts, data):
    top_k = data.draw(st.integers(1, num_experts))
    capacity = data.draw(st.one_of(st.none(), st.integers(1, 2 * num_tokens)))
    renormalize = data.draw(st.booleans())
    batch_priority = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    router = TopKRouter(8, num_experts, top_k, renormalize=renormalize, batch_priority=batch_priority)
    experts = Experts(num_experts, 8, 16)
    tokens = torch.randn(num_tokens, 8)
    routing, plan = plan_dispatch(router(tokens), capacity)

    weights = routing.combine_weights
    assert (weights >= 0).all()
    assert (weights.sum(-1) <= 1 + 1e-5).all()
    kept = ~routing.dropped
    counts = torch.bincount(routing.expert_index[kept], minlength=num_experts)
    assert torch.equal(counts, plan.group_sizes)
    if capacity is None:
        assert kept.all()
    else:
        assert counts.max() <= capacity
        # Nothing is dropped from an expert that still has room.
        for e in range(num_experts):
            if (routing.dropped & (routing.expert_index == e)).any():
                assert counts[e] == capacity
    assert torch.all(weights[routing.dropped] == 0)
    sorted_out = experts(tokens, routing, plan, "sorted")
    if capacity is not None:
        torch.testing.assert_close(experts(tokens, routing, plan, "buffers"), sorted_out, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(sorted_out).all()
