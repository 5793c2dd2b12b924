"""Three modalities (image, text, audio) through every modality-aware piece: ``ModalityLayerNorm``, ``MultiwayFFN``
(dense and VL-MoE's sparse per-modality FFNs), ``ModalityMoE`` pools, ``routing_statistics``, the training telemetry
and the evaluation routing report. Each layer is checked against a naive per-token forward and backward; a modality
id outside ``[0, 3)`` is an ``InvalidInputError`` naming the ids and the range."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mome
from mome._errors import InvalidInputError
from mome.layers import ModalityMoE, MultiwayFFN, SparseMoE
from mome.layers.modality import ModalityLayerNorm
from mome.layers.routers import ModalityRouter
from mome.lit.callbacks import RoutingTelemetry
from mome.lit.routing_report import RoutingRecorder

NAMES = ("image", "text", "audio")
IDS = torch.tensor([[0, 2, 1, 2, 2, 0, 1], [2, 1, 0, 0, 2, 1, 2]])  # [B=2, N=7]: every modality, audio the most


def _randomise(module: nn.Module) -> None:
    torch.manual_seed(1)
    for param in module.parameters():
        nn.init.normal_(param, std=0.3)


def _expert_ffn(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of an :class:`~mome.layers.Experts` on one token ``x [D]`` (GELU MLP, written out)."""
    return F.gelu(x @ experts.w_in[e].T + experts.b_in[e]) @ experts.w_out[e].T + experts.b_out[e]


def _check_forward_backward(layer: nn.Module, run, reference) -> None:
    """``run(x)`` and ``reference(x)`` agree forward, and in the gradients of ``x`` and of every parameter."""
    x = torch.randn(*IDS.shape, 8, requires_grad=True)
    out = run(x)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *layer.parameters()], grad, allow_unused=True)
    expected_out = reference(x)
    expected = torch.autograd.grad(expected_out, [x, *layer.parameters()], grad, allow_unused=True)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    names = ["x", *(name for name, _ in layer.named_parameters())]
    for name, a, b in zip(names, got, expected, strict=True):
        if a is None or b is None:
            assert a is None and b is None or float((a if b is None else b).abs().sum()) == 0, name
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def _check_loads(load: torch.Tensor, present: list[int]) -> None:
    """``expert_load_per_modality [M, E]``: each modality with tokens sums to one, the others are zero."""
    sums = load.sum(-1)
    for m in range(load.shape[0]):
        assert float(sums[m]) == pytest.approx(1.0 if m in present else 0.0), (m, load)


# -- MultiwayFFN ---------------------------------------------------------------------------------------------------
def test_dense_multiway_routes_each_modality_to_its_ffn_and_norm():
    layer = MultiwayFFN(8, 16, modalities=NAMES)
    _randomise(layer)
    experts, norm = layer.moe.experts, layer.norm

    def reference(x):
        rows = []
        for b, n in torch.cartesian_prod(torch.arange(2), torch.arange(7)).tolist():
            m = int(IDS[b, n])
            normed = F.layer_norm(x[b, n], (8,), norm.weight[m], norm.bias[m], 1e-6)
            rows.append(_expert_ffn(experts, m, normed))
        return torch.stack(rows).view(2, 7, 8)

    _check_forward_backward(layer, lambda x: layer(x, IDS), reference)
    load = mome.routing_stats(layer)["moe"]["expert_load_per_modality"]
    torch.testing.assert_close(load, torch.eye(3))  # modality m's tokens all go to FFN m


def test_sparse_multiway_gives_each_modality_its_own_moe():
    """VL-MoE with a third modality: the audio tokens go through ``sparse["audio"]`` only, routed among its experts
    (top-2 of 3, dropless), each token ``sum_j G_j FFN_{e_j}(LN_audio(x))``."""
    layer = MultiwayFFN(8, 16, modalities=NAMES, moe={"num_experts": 3, "top_k": 2, "renormalize": True})
    _randomise(layer)

    def reference(x):
        rows = []
        for b, n in torch.cartesian_prod(torch.arange(2), torch.arange(7)).tolist():
            m = int(IDS[b, n])
            sparse = layer.sparse[NAMES[m]]
            normed = F.layer_norm(x[b, n], (8,), layer.norm.weight[m], layer.norm.bias[m], 1e-6)
            probs = torch.softmax(sparse.router.proj(normed).float(), -1)  # [E]
            weights, chosen = probs.topk(2)
            weights = weights / weights.sum()
            rows.append(sum(w * _expert_ffn(sparse.experts, int(e), normed) for w, e in zip(weights, chosen)))
        return torch.stack(rows).view(2, 7, 8)

    _check_forward_backward(layer, lambda x: layer(x, IDS), reference)
    stats = mome.routing_stats(layer)
    assert set(stats) == {f"sparse.{name}" for name in NAMES}
    for m, name in enumerate(NAMES):
        load = stats[f"sparse.{name}"]["expert_load_per_modality"]
        assert load.shape == (3, 3)
        _check_loads(load, [m])  # each modality's MoE records its own row only


# -- ModalityMoE -----------------------------------------------------------------------------------------------------
def test_modality_moe_routes_the_third_modality_within_its_pool():
    """Pools image 0-1, text 2-3, audio 4-6, top-2 renormalised, one shared expert: a token of modality ``m`` is
    ``sum_j G_j FFN_{e_j}(x) + FFN_shared(x)``, its softmax over its pool's logits only."""
    layer = ModalityMoE(8, 16, dict(zip(NAMES, (2, 2, 3), strict=True)), top_k=2, num_shared_experts=1)
    _randomise(layer)
    pools = [[0, 1], [2, 3], [4, 5, 6]]

    def reference(x):
        rows = []
        for b, n in torch.cartesian_prod(torch.arange(2), torch.arange(7)).tolist():
            token, pool = x[b, n], pools[int(IDS[b, n])]
            logits = layer.router.proj(token).float()[pool]  # [|pool|]
            weights, chosen = torch.softmax(logits, -1).topk(2)
            weights = weights / weights.sum()
            routed = sum(w * _expert_ffn(layer.experts, pool[int(j)], token) for w, j in zip(weights, chosen))
            rows.append(routed + layer.shared_experts(token))
        return torch.stack(rows).view(2, 7, 8)

    _check_forward_backward(layer, lambda x: layer(x, IDS), reference)
    assert layer.num_modalities == 3 and layer.modality_names == list(NAMES)
    load = layer.last_routing_stats["expert_load_per_modality"]  # [3, 7]
    _check_loads(load, [0, 1, 2])
    for m, pool in enumerate(pools):
        outside = [e for e in range(7) if e not in pool]
        assert torch.all(load[m, outside] == 0), (m, load[m])


# -- telemetry and the routing report ---------------------------------------------------------------------------------
class _ThreeModalityModel(nn.Module):
    """Two ModalityMoE layers over tokens of three named modalities (as LIMoE with audio names its own)."""

    modality_names = NAMES

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ModalityMoE(8, 16, [2, 2, 3], top_k=2, num_shared_experts=0) for _ in range(2))

    def forward(self, x, modality_ids):
        for layer in self.layers:
            x = x + layer(x, modality_ids)
        return x


def _expert_counts(routing) -> torch.Tensor:
    """``[M, E]`` assignments of one router call (dropless: every one computed)."""
    counts = torch.zeros(3, 7, dtype=torch.float64)
    rows = routing.modality_ids.repeat_interleave(routing.top_k)
    counts.index_put_((rows, routing.expert_index.reshape(-1)), torch.ones(rows.numel(), dtype=torch.float64), True)
    return counts


def test_telemetry_and_routing_report_count_three_modalities(tmp_path):
    torch.manual_seed(0)
    model = _ThreeModalityModel().eval()
    x = torch.randn(*IDS.shape, 8)
    routings = {index: [] for index in range(2)}
    hooks = [
        layer.router.register_forward_hook(lambda module, args, out, i=index: routings[i].append(out))
        for index, layer in enumerate(model.layers)
    ]
    recorder = RoutingRecorder().attach(model)
    with torch.no_grad():
        for _ in range(2):  # two passes: the report sums them
            model(x, IDS)
    for hook in hooks:
        hook.remove()
    counts = {index: sum(_expert_counts(r) for r in found) for index, found in routings.items()}
    recorder.detach()
    scalars = RoutingTelemetry.scalars(mome.routing_stats(model))
    report = recorder.report()
    tokens = torch.bincount(IDS.reshape(-1), minlength=3)
    for index, layer in enumerate(model.layers):
        load = layer.last_routing_stats["expert_load_per_modality"]
        _check_loads(load, [0, 1, 2])
        for e in range(7):  # the telemetry's per-modality scalars are the layer's rows, modality 2 included
            assert scalars[f"routing/layers.{index}/m2/load_e{e}"] == pytest.approx(float(load[2, e]))
        entry = report["layers"][f"layers.{index}"]
        assert list(entry["per_modality"]) == list(NAMES)
        for m, name in enumerate(NAMES):
            values = entry["per_modality"][name]
            assert values["tokens"] == 2 * int(tokens[m])
            expected = counts[index][m] / counts[index][m].sum()
            assert values["expert_load"] == pytest.approx(expected.tolist())
            assert sum(values["expert_load"]) == pytest.approx(1.0)
    assert recorder.drops()["dropped_fraction"] == 0.0


def test_token_modalities_name_the_prompt_tokens_of_a_layer_without_ids():
    """A model whose MoE layers get no modality ids (MoE-LLaVA, Uni-MoE): inside ``token_modalities`` the call over
    the whole prompt takes the given ids, shorter calls (decoding steps) the ``otherwise`` modality."""

    class _Model(nn.Module):
        modality_names = NAMES

        def __init__(self) -> None:
            super().__init__()
            self.moe = SparseMoE(8, 16, 4, top_k=2)

    model = _Model()
    recorder = RoutingRecorder().attach(model)
    prompt = torch.tensor([1, 0, 0, 2, 2, 2, 1])
    with torch.no_grad(), recorder.token_modalities(prompt, otherwise=1):
        model.moe(torch.randn(7, 8))  # the prompt
        model.moe(torch.randn(1, 8))  # two decoding steps
        model.moe(torch.randn(1, 8))
    model.moe(torch.randn(5, 8))  # outside: no modality ids, modality 0
    per_modality = recorder.report()["layers"]["moe"]["per_modality"]
    assert {name: values["tokens"] for name, values in per_modality.items()} == {"image": 2 + 5, "text": 4, "audio": 3}


# -- a modality id outside the model's modalities ----------------------------------------------------------------------
LAYERS = {
    "ModalityLayerNorm": lambda: (ModalityLayerNorm(8, 3), lambda layer, x, ids: layer(x, ids)),
    "MultiwayFFN": lambda: (MultiwayFFN(8, 16, modalities=NAMES), lambda layer, x, ids: layer(x, ids)),
    "MultiwayFFN(moe=)": lambda: (
        MultiwayFFN(8, 16, modalities=NAMES, moe={"num_experts": 2, "top_k": 1}),
        lambda layer, x, ids: layer(x, ids),
    ),
    "ModalityMoE": lambda: (ModalityMoE(8, 16, [1, 1, 1]), lambda layer, x, ids: layer(x, ids)),
    "SparseMoE": lambda: (SparseMoE(8, 16, 2, top_k=1, num_modalities=3), lambda layer, x, ids: layer(x, ids)),
    "ModalityRouter": lambda: (
        ModalityRouter(3),
        lambda layer, x, ids: layer(x.reshape(-1, 8), ids.reshape(-1)),
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("bad", [3, -1])
def test_a_modality_id_outside_the_modalities_is_a_typed_error(name, bad):
    layer, call = LAYERS[name]()
    ids = IDS.clone()
    ids[1, 3] = bad
    with pytest.raises(InvalidInputError, match=r"modality_ids") as error:
        call(layer, torch.randn(*IDS.shape, 8), ids)
    message = str(error.value)
    assert "ids in [0, 3)" in message and f"ids [{bad}]" in message, message
