"""Property-based fuzzing of every MoE layer and router: bad arguments and bad inputs are typed errors, good ones work.

Two properties, each checked against an oracle written here (what the docs say is accepted), not against the code:

- construction: arguments are drawn valid or invalid (0, negatives, inf, nan, bools, floats for ints, wrong
  strings, None); an invalid one must raise a :class:`mome.MomeError`; all-valid ones must build a layer whose forward
  pass on a valid input is finite and of the right shape;
- forward: inputs of rank 1-4, last dim right or wrong, batch/tokens possibly 0, float32/bfloat16/int64, modality
  and token ids in and out of range or of the wrong shape/dtype; an invalid input must raise a ``MomeError``, a valid
  one must give a finite output of the input's shape (finite gradients too, for the layers).

Any other exception type fails. Sizes: ``CONSTRUCT_EXAMPLES`` per class, ``LAYER_EXAMPLES`` per layer kind,
``ROUTER_EXAMPLES`` per router kind (``TOTAL_EXAMPLES`` in all).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mome import MomeError
from mome.layers import (
    SMEAR,
    ExpertChoiceRouter,
    Experts,
    GShardTop2Router,
    HashRouter,
    ModalityLayerNorm,
    ModalityMoE,
    ModalityRouter,
    MultiwayFFN,
    NoisyTopKRouter,
    SoftMoE,
    SparseMoE,
    TopKRouter,
)

CONSTRUCT_EXAMPLES = 25
LAYER_EXAMPLES = 25
ROUTER_EXAMPLES = 25

# ------------------------------------------------------------------------------------------- argument values
BAD_INT = [0, -1, -3, True, False, 2.0, 1.5, math.nan, math.inf, "4", None]
BAD_POSITIVE = [0.0, -1.0, math.nan, math.inf, -math.inf, True, "1.0"]
BAD_NONNEGATIVE = [-0.5, math.nan, math.inf, True, "0"]


def arg(valid, invalid) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """Strategies of ``(value, is_valid)``: only valid values, and valid or invalid ones; ``valid`` is a strategy,
    ``invalid`` a list of values that must be rejected."""
    good = valid.map(lambda v: (v, True))
    return good, st.one_of(good, st.sampled_from(invalid).map(lambda v: (v, False)))


def pos_int(high=6):
    return arg(st.integers(1, high), BAD_INT)


def pos_float(optional=False):
    valid = st.floats(0.25, 4.0)
    return arg(st.one_of(st.none(), valid) if optional else valid, BAD_POSITIVE)


def run_layer(layer, x, modality_ids=None, **kwargs):
    """Forward (and backward for float32) of ``layer``; asserts the output is finite and of ``x``'s shape/dtype."""
    x = x.clone().requires_grad_(x.dtype == torch.float32)
    out = layer(x, modality_ids, **kwargs) if modality_ids is not None else layer(x, **kwargs)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out.float()).all()
    if x.requires_grad:
        out.square().sum().backward()
        assert torch.isfinite(x.grad).all()
        for name, parameter in layer.named_parameters():
            assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
    return out


def check_routing(routing, num_tokens: int, num_experts: int) -> None:
    assert routing.expert_index.shape[0] == num_tokens and routing.combine_weights.shape == routing.expert_index.shape
    assert routing.router_probs.shape == (num_tokens, num_experts)
    assert torch.isfinite(routing.combine_weights).all() and torch.isfinite(routing.router_probs).all()
    if num_tokens:
        assert 0 <= int(routing.expert_index.min()) and int(routing.expert_index.max()) < num_experts


# ---------------------------------------------------------------------------------------------- construction
def _router_probe(router, dim):
    x = torch.randn(5, dim)
    ids = torch.zeros(5, dtype=torch.long) if getattr(router, "num_modalities", None) else None
    tokens = torch.arange(5) % router.table.numel() if isinstance(router, HashRouter) else None
    check_routing(router.train()(x, ids, tokens), 5, router.num_experts)


def _layer_probe(layer, dim, needs_ids):
    ids = torch.zeros(2, 3, dtype=torch.long) if needs_ids else None
    run_layer(layer.train(), torch.randn(2, 3, dim), ids)


def _experts_probe(experts, num_experts, dim):
    buffers = torch.randn(num_experts, 3, dim)
    out = experts.forward_batched(buffers)
    assert out.shape == buffers.shape and torch.isfinite(out).all()


def _counts(experts_per_modality):
    return list(experts_per_modality.values()) if isinstance(experts_per_modality, dict) else experts_per_modality


# name -> (build(**kwargs), {argument: strategy of (value, valid)}, cross-argument constraint, probe)
CONSTRUCTORS = {
    "TopKRouter": (
        TopKRouter,
        {
            "dim": pos_int(),
            "num_experts": pos_int(),
            "top_k": pos_int(3),
            "noise_std": arg(st.floats(0, 2), BAD_NONNEGATIVE),
        },
        lambda a: a["top_k"] <= a["num_experts"],
        lambda layer, a: _router_probe(layer, a["dim"]),
    ),
    "NoisyTopKRouter": (
        NoisyTopKRouter,
        {"dim": pos_int(), "num_experts": pos_int(), "top_k": pos_int(3)},
        lambda a: a["top_k"] <= a["num_experts"],
        lambda layer, a: _router_probe(layer, a["dim"]),
    ),
    "GShardTop2Router": (
        GShardTop2Router,
        {"dim": pos_int(), "num_experts": pos_int()},
        lambda a: a["num_experts"] >= 2,
        lambda layer, a: _router_probe(layer, a["dim"]),
    ),
    "ExpertChoiceRouter": (
        ExpertChoiceRouter,
        {"dim": pos_int(), "num_experts": pos_int(), "capacity_factor": pos_float()},
        lambda a: True,
        lambda layer, a: _router_probe(layer, a["dim"]),
    ),
    "HashRouter": (
        HashRouter,
        {"num_experts": pos_int(), "num_buckets": pos_int(64), "seed": arg(st.integers(0, 99), [-1, True, 1.5, "0"])},
        lambda a: True,
        lambda layer, a: _router_probe(layer, 4),
    ),
    "ModalityRouter": (
        ModalityRouter,
        {"num_modalities": pos_int()},
        lambda a: True,
        lambda layer, a: _router_probe(layer, 4),
    ),
    "Experts": (
        Experts,
        {
            "num_experts": pos_int(),
            "dim": pos_int(),
            "hidden_dim": pos_int(),
            "dispatch": arg(st.sampled_from(["sorted", "buffers"]), ["loop", "", None, 3]),
            "dispatch_dtype": arg(st.sampled_from([None, "bfloat16", torch.float32]), ["int8", torch.int64, 3]),
        },
        lambda a: True,
        lambda layer, a: _experts_probe(layer, a["num_experts"], a["dim"]),
    ),
    "SparseMoE": (
        SparseMoE,
        {
            "dim": pos_int(),
            "hidden_dim": pos_int(),
            "num_experts": pos_int(),
            "top_k": pos_int(3),
            "router": arg(
                st.sampled_from(["top_k", "noisy_top_k", "expert_choice", "hash", "modality"]), ["nope", "", 3]
            ),
            "capacity_factor": pos_float(optional=True),
            "eval_capacity_factor": pos_float(optional=True),
            "capacity_multiple": pos_int(4),
            "min_capacity": arg(st.integers(0, 4), [-1, True, 1.5, math.inf]),
            "dispatch": arg(st.sampled_from(["sorted", "buffers"]), ["loop", None, 3]),
            "num_shared_experts": arg(st.integers(0, 2), [-1, True, 0.5]),
            "aux_loss_weights": arg(
                st.sampled_from([{}, {"importance": 0.01}, {"z_loss": 1.0}]),
                [{"bogus": 1.0}, {"importance": math.nan}, {"importance": -1.0}, {"z_loss": True}, ["importance"]],
            ),
        },
        lambda a: (
            a["top_k"] <= a["num_experts"]
            and (a["router"] in ("top_k", "noisy_top_k", "expert_choice") or not a["aux_loss_weights"])
            and (
                a["dispatch"] == "sorted"
                or a["router"] == "expert_choice"
                or None not in (a["capacity_factor"], a["eval_capacity_factor"])
            )
        ),
        lambda layer, a: _layer_probe(layer, a["dim"], a["router"] == "modality"),
    ),
    "SoftMoE": (
        SoftMoE,
        {"dim": pos_int(), "hidden_dim": pos_int(), "num_experts": pos_int(), "slots_per_expert": pos_int(3)},
        lambda a: True,
        lambda layer, a: _layer_probe(layer, a["dim"], False),
    ),
    "SMEAR": (
        SMEAR,
        {"dim": pos_int(), "hidden_dim": pos_int(), "num_experts": pos_int()},
        lambda a: True,
        lambda layer, a: _layer_probe(layer, a["dim"], False),
    ),
    "MultiwayFFN": (
        MultiwayFFN,
        {
            "dim": pos_int(),
            "hidden_dim": pos_int(),
            "modalities": arg(
                st.sampled_from([("image", "text"), ("image",), ["a", "b", "c"]]), [(), ("a", "a"), "ab", (1, 2)]
            ),
            "eps": pos_float(),
        },
        lambda a: True,
        lambda layer, a: _layer_probe(layer, a["dim"], True),
    ),
    "ModalityMoE": (
        ModalityMoE,
        {
            "dim": pos_int(),
            "hidden_dim": pos_int(),
            "experts_per_modality": arg(
                st.one_of(
                    st.lists(st.integers(1, 3), min_size=1, max_size=3),
                    st.sampled_from([{"image": 2, "text": 1}]),
                ),
                [[], [0, 2], [2, -1], [True, 1], [1.5], "22", {"image": 0}, 3],
            ),
            "top_k": pos_int(2),
            "num_shared_experts": arg(st.integers(0, 2), [-1, True, 0.5]),
        },
        lambda a: a["top_k"] <= min(_counts(a["experts_per_modality"])),
        lambda layer, a: _layer_probe(layer, a["dim"], True),
    ),
    "ModalityLayerNorm": (
        ModalityLayerNorm,
        {"dim": pos_int(), "num_modalities": pos_int(), "eps": pos_float()},
        lambda a: True,
        lambda layer, a: run_layer(layer, torch.randn(2, 3, a["dim"]), torch.zeros(2, 3, dtype=torch.long)),
    ),
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
@settings(max_examples=CONSTRUCT_EXAMPLES, deadline=None)
@given(data=st.data())
def test_construction_rejects_every_bad_argument_and_accepts_every_good_one(name, data):
    build, arguments, constraint, probe = CONSTRUCTORS[name]
    only_valid = data.draw(st.booleans(), label="only_valid")  # else each argument may be invalid
    drawn = {key: data.draw(strategies[not only_valid], label=key) for key, strategies in arguments.items()}
    kwargs = {key: value for key, (value, _) in drawn.items()}
    valid = all(ok for _, ok in drawn.values()) and constraint(kwargs)
    torch.manual_seed(0)
    try:
        layer = build(**kwargs)
    except MomeError as error:
        assert not valid, f"valid arguments {kwargs} rejected: {error}"
        assert str(error)  # a message naming the argument
        return
    assert valid, f"invalid arguments {kwargs} accepted"
    probe(layer, kwargs)


# --------------------------------------------------------------------------------------------------- forward
DIM = 8

# kind -> (build, accepted ranks (min, max), modality ids: "required" / "optional" / "ignored", num_modalities,
#          forward kwargs)
LAYERS = {
    "sparse_top_k": (lambda: SparseMoE(DIM, 16, 4, 2), (1, None), "optional", 1, {}),
    "sparse_noisy_bpr_capacity": (
        lambda: SparseMoE(DIM, 16, 4, 2, router="noisy_top_k", batch_priority=True, capacity_factor=1.0),
        (1, None),
        "optional",
        1,
        {},
    ),
    "sparse_buffers_3_modalities": (
        lambda: SparseMoE(DIM, 16, 4, 2, capacity_factor=1.0, dispatch="buffers", num_modalities=3),
        (1, None),
        "optional",
        3,
        {},
    ),
    "sparse_expert_choice": (lambda: SparseMoE(DIM, 16, 4, router="expert_choice"), (1, None), "optional", 1, {}),
    "sparse_hash": (lambda: SparseMoE(DIM, 16, 4, 1, router="hash"), (2, None), "optional", 1, {}),
    "sparse_modality_router": (lambda: SparseMoE(DIM, 16, 2, 1, router="modality"), (1, None), "required", 2, {}),
    "sparse_pools": (
        lambda: SparseMoE(DIM, 16, 4, 1, modality_experts=[[0, 1], [2, 3]]),
        (1, None),
        "required",
        2,
        {},
    ),
    "soft": (lambda: SoftMoE(DIM, 16, 4, 2), (2, 3), "ignored", 1, {}),
    "smear": (lambda: SMEAR(DIM, 16, 4), (2, 3), "ignored", 1, {}),
    "modality_moe": (lambda: ModalityMoE(DIM, 16, [2, 2], 1), (1, None), "required", 2, {}),
    "multiway": (lambda: MultiwayFFN(DIM, 16), (1, None), "required", 2, {}),
    "multiway_vl": (lambda: MultiwayFFN(DIM, 16, vl_expert=True), (1, None), "ignored", 2, {"use_vl": True}),
}


@st.composite
def tokens(draw, dim=DIM):
    """``(x, x_ok)``: a tensor of rank 1-4 with sizes 0-3, last dim ``dim`` or not, float32/bfloat16/int64."""
    rank = draw(st.integers(1, 4))
    shape = [draw(st.integers(0, 3)) for _ in range(rank - 1)]
    last = draw(st.sampled_from([dim] * 6 + [dim - 1, dim + 1]))
    dtype = draw(st.sampled_from([torch.float32] * 4 + [torch.bfloat16, torch.int64]))
    x = torch.randn(*shape, last).to(dtype) if dtype != torch.int64 else torch.randint(-3, 3, (*shape, last))
    return x, last == dim


@st.composite
def ids_for(draw, shape, limit, absent_ok=True):
    """``(ids, ids_ok)``: ids of ``shape`` in ``[0, limit)``, or absent, out of range, of another shape or dtype."""
    kind = draw(st.sampled_from(["none", "valid", "valid", "valid", "high", "negative", "shape", "float"]))
    if kind == "none":
        return None, absent_ok
    ids = torch.randint(0, limit, tuple(shape))
    if kind == "valid":
        return ids, True
    if kind in ("high", "negative"):
        if ids.numel() == 0:
            return ids, True  # nothing to put out of range
        ids.view(-1)[draw(st.integers(0, ids.numel() - 1))] = limit if kind == "high" else -1
        return ids, False
    if kind == "shape":
        return torch.zeros(*shape, 2, dtype=torch.long), False
    return ids.float(), False


def expect(valid: bool, call):
    """Run ``call``: a MomeError exactly when the input is invalid; any other exception propagates (a failure)."""
    try:
        result = call()
    except MomeError as error:
        assert not valid, f"a valid input was rejected: {error}"
        return None
    assert valid, "an invalid input was accepted"
    return result


@pytest.mark.parametrize("kind", sorted(LAYERS))
@settings(max_examples=LAYER_EXAMPLES, deadline=None)
@given(data=st.data())
def test_layer_forward_rejects_bad_inputs_and_keeps_good_ones_finite(kind, data):
    build, (min_rank, max_rank), ids_rule, num_modalities, kwargs = LAYERS[kind]
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    layer = build().train()
    x, x_ok = data.draw(tokens(), label="x")
    rank_ok = min_rank <= x.dim() and (max_rank is None or x.dim() <= max_rank)
    valid = x_ok and rank_ok and x.dtype == torch.float32
    ids, ids_ok = data.draw(ids_for(x.shape[:-1], num_modalities, absent_ok=ids_rule != "required"), label="ids")
    if ids_rule != "ignored":
        valid = valid and ids_ok
    else:
        ids = None
    if kind == "sparse_hash":
        token_ids, token_ok = data.draw(ids_for(x.shape[:-1], 65536), label="token_ids")
        if token_ids is not None:
            kwargs = {**kwargs, "token_ids": token_ids}
            valid = x_ok and x.dtype == torch.float32 and ids_ok and token_ok  # any rank: ids replace positions
    expect(valid, lambda: run_layer(layer, x, ids, **kwargs))


ROUTERS = {
    # kind -> (build, experts, router width or None (any), modality ids: required / ignored, num_modalities)
    "top_k": (lambda: TopKRouter(DIM, 4, 2), 4, DIM, "ignored", 1),
    "noisy_top_k_bpr": (lambda: NoisyTopKRouter(DIM, 4, 2, batch_priority=True), 4, DIM, "ignored", 1),
    "top_k_pools": (lambda: TopKRouter(DIM, 4, 1, modality_experts=[[0, 1], [2, 3]]), 4, DIM, "required", 2),
    "gshard_top2": (lambda: GShardTop2Router(DIM, 4), 4, DIM, "ignored", 1),
    "expert_choice": (lambda: ExpertChoiceRouter(DIM, 4, 1.5), 4, DIM, "ignored", 1),
    "hash": (lambda: HashRouter(4, 32), 4, None, "ignored", 1),
    "modality": (lambda: ModalityRouter(3), 3, None, "required", 3),
}


@pytest.mark.parametrize("kind", sorted(ROUTERS))
@settings(max_examples=ROUTER_EXAMPLES, deadline=None)
@given(data=st.data())
def test_router_rejects_bad_inputs_and_routes_good_ones(kind, data):
    build, num_experts, width, ids_rule, num_modalities = ROUTERS[kind]
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    router = build().train()
    x, x_ok = data.draw(tokens(), label="x")
    valid = x.dim() == 2 and x.dtype != torch.int64 and (x_ok or width is None)  # routers compute in fp32
    ids, ids_ok = data.draw(ids_for(x.shape[:1], num_modalities, absent_ok=ids_rule != "required"), label="ids")
    if ids_rule == "required":
        valid = valid and ids_ok
    token_ids = None
    if kind == "hash":  # required, in [0, num_buckets)
        token_ids, token_ok = data.draw(ids_for(x.shape[:1], 32, absent_ok=False), label="token_ids")
        valid = valid and token_ok
    routing = expect(valid, lambda: router(x, ids, token_ids))
    if routing is not None:
        check_routing(routing, x.shape[0], num_experts)


TOTAL_EXAMPLES = CONSTRUCT_EXAMPLES * len(CONSTRUCTORS) + LAYER_EXAMPLES * len(LAYERS) + ROUTER_EXAMPLES * len(ROUTERS)


# ------------------------------------------------------------------------------------------ explicit cases
@pytest.mark.parametrize("shape", [(2, 0, DIM), (0, 5, DIM), (0, 0, DIM), (0, DIM)])
def test_soft_moe_on_an_empty_batch_gives_an_empty_finite_output_and_finite_gradients(shape):
    """Soft MoE on no tokens (batch 0 and/or 0 tokens): an empty output of the input's shape, zero statistics, finite
    gradients (the slots of an empty sequence are zero vectors, the combine has no rows)."""
    layer = SoftMoE(DIM, 16, 4, 2).train()
    out = run_layer(layer, torch.zeros(shape))
    assert out.shape == shape and out.numel() == 0
    stats = layer.last_routing_stats
    assert all(torch.isfinite(value).all() and not value.any() for value in stats.values())
    assert stats["expert_load"].shape == (4,)


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_an_infinite_or_nan_capacity_factor_is_rejected_by_name(value):
    from mome import InvalidArgumentError

    for build in (
        lambda: SparseMoE(DIM, 16, 4, 2, capacity_factor=value),
        lambda: SparseMoE(DIM, 16, 4, 2, eval_capacity_factor=value),
        lambda: SparseMoE(DIM, 16, 4, router="expert_choice", capacity_factor=value),
        lambda: ExpertChoiceRouter(DIM, 4, value),
    ):
        with pytest.raises(InvalidArgumentError, match="capacity_factor must be a finite number > 0"):
            build()


def test_a_modality_id_outside_the_modalities_is_a_typed_error_naming_modality_ids():
    from mome import InvalidInputError

    with pytest.raises(
        InvalidInputError, match=r"modality_ids must be ids in \[0, 2\) .*, got ids \[5\] \(values in \[0, 5\]\)"
    ):
        MultiwayFFN(DIM, 16)(torch.randn(1, 3, DIM), torch.tensor([[0, 5, 1]]))


@pytest.mark.parametrize("dim", [1, 2, 3, 5])
def test_widths_grouped_mm_cannot_take_fall_back_in_the_backward_pass_too(dim):
    """Widths that are not 16-byte aligned (found by the construction fuzz: ``dim=1, hidden_dim=4``): the grouped matmul
    of the second projection was accepted in the forward pass, and its backward (gradient rows of ``dim`` values)
    raised a RuntimeError; such widths take the per-expert path both ways."""
    torch.manual_seed(0)
    run_layer(SparseMoE(dim, 4, 2, 1).train(), torch.randn(2, 3, dim))
