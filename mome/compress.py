"""Expert pruning and merging: an MoE model in, the same model with fewer experts per MoE layer out.

Both read how a model routes a small calibration set (:func:`expert_usage`) and shrink every token-choice
:class:`~mome.layers.MoE` layer of the model to the same number of experts, so the result saves with
:func:`mome.save_pretrained` (its recorded ``model_args`` say the new ``num_experts``) and reloads with
``mome.create_model("local-dir:...")``:

- :func:`prune_experts`: keep the ``keep`` experts each layer's router chose most often (or given indices);
  the experts' stacked weights, the router's rows and every per-expert router tensor are sliced.
- :func:`merge_experts`: MC-SMoE's merging (Li et al. 2023, "Merge, Then Compress: Demystify Efficient SMoE with
  Hints from Its Routing Policy", arXiv:2310.01334, sec. 3): the ``G`` most used experts are the dominant experts,
  every other expert joins the dominant expert whose router logits are most similar to its own, and each group
  becomes one expert by frequency-weighted averaging after aligning the hidden units of its members to the
  dominant expert's (weight matching, as in Git Re-Basin, Ainsworth et al. 2023).

Notation: ``E`` experts, ``k`` experts per token, ``D`` width, ``H`` hidden units of an expert, ``T`` calibration
tokens, ``c_e`` the number of calibration tokens whose top-k choices include expert ``e`` (before capacity) and
``f_e = c_e / sum_j c_j`` its routing frequency.

What is refused (:class:`~mome.UnsupportedModelError`, naming the layer): Soft MoE and SMEAR layers (no token is
routed to an expert: every expert sees every token's slot or merged weights, so there is no routing frequency);
hash routing (a fixed table sends token ids to every expert, a removed expert's ids would go nowhere); modality
routing (VLMo: one expert per modality, nothing to choose among); expert-choice routing (each expert takes the same
number of tokens by design, so frequencies do not rank experts); top-k routers with per-modality pools or
device-limited groups (the pools and groups are sets of expert indices that the family's arguments cannot express
after a change); experts sharded over processes (gather them first). A model whose recorded ``model_args`` cannot
say the result (different counts per layer, or a count that DeepSeekMoE's segmentation ``m`` does not divide) is
refused before anything changes.

Both functions return a compressed deep copy by default (``inplace=False``); the compressed layers hold new
``nn.Parameter`` objects, so an optimizer must be built after compressing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_int
from ._errors import InvalidArgumentError, UnsupportedModelError
from .layers import (
    SMEAR,
    BaseLayerRouter,
    ExpertChoiceRouter,
    Experts,
    HashRouter,
    ModalityRouter,
    MoE,
    RoutedLayer,
    Routing,
    ShardedExperts,
    SinkhornRouter,
    SoftMoE,
    TopKRouter,
    XMoERouter,
)

__all__ = [
    "ExpertUsage",
    "expert_usage",
    "match_hidden_units",
    "merge_experts",
    "permute_hidden_units",
    "prune_experts",
]

#: Why a layer or router cannot be compressed, by type (checked in this order).
_REFUSED: tuple[tuple[type, str], ...] = (
    (SoftMoE, "a Soft MoE layer mixes every token into every expert's slots (no token is routed to an expert)"),
    (SMEAR, "a SMEAR layer merges all experts per example (no token is routed to an expert)"),
    (HashRouter, "hash routing sends fixed token ids to every expert (a removed expert's ids would go nowhere)"),
    (ModalityRouter, "modality routing gives each modality its own expert (nothing is chosen among them)"),
    (
        ExpertChoiceRouter,
        "expert-choice routing gives every expert the same number of tokens by design (frequencies rank nothing)",
    ),
)
#: The routers whose per-expert tensors this module slices (subclasses included: GShard, noisy top-k).
_ROUTERS = (TopKRouter, BaseLayerRouter, SinkhornRouter, XMoERouter)


# ------------------------------------------------------------------------------------------------ routing usage
@dataclass
class ExpertUsage:
    """How one MoE layer routed the calibration tokens.

    Attributes:
        counts: ``[E]`` float64, ``c_e``: the tokens whose top-k choices include expert ``e`` (the router's own
            choices, before any capacity; assignments the router itself declined are not counted).
        tokens: ``T``, the tokens routed.
        logit_gram: ``[E, E]`` float64, ``sum_t l_t l_t^T`` over the router logits ``l_t [E]`` of the tokens (what
            :meth:`similarity` needs), or None (a router without logits).
    """

    counts: Tensor
    tokens: int
    logit_gram: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def frequency(self) -> Tensor:
        """``f_e = c_e / sum_j c_j`` (``[E]``; zeros when nothing was routed)."""
        return self.counts / self.counts.sum().clamp_min(1)

    def similarity(self) -> Tensor:
        """``[E, E]`` cosine similarity of the experts' router-logit columns over the calibration tokens (MC-SMoE's
        grouping feature): ``S[i, j] = <L[:, i], L[:, j]> / (|L[:, i]| |L[:, j]|)`` with ``L [T, E]`` the logits."""
        if self.logit_gram is None:
            raise InvalidArgumentError("usage", "an ExpertUsage with logit_gram (router logits)", None, "similarity")
        norms = self.logit_gram.diagonal().clamp_min(1e-300).sqrt()  # [E]
        return self.logit_gram / (norms[:, None] * norms[None, :])


def _compressible_layers(model: nn.Module, owner: str) -> list[tuple[str, MoE]]:
    """The token-choice MoE layers of ``model`` (every routed layer must be one this module can compress)."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError("model", "a torch nn.Module with MoE layers", type(model).__name__, owner)
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, RoutedLayer):
            continue
        where = f"layer {name!r}" if name else "the model"
        parts = [module] if not isinstance(module, MoE) else [module, module.router]
        for part in parts:
            for kind, reason in _REFUSED:
                if isinstance(part, kind):
                    raise UnsupportedModelError(f"{owner}: cannot compress {where} ({type(part).__name__}): {reason}")
        if not isinstance(module, MoE):
            raise UnsupportedModelError(
                f"{owner}: cannot compress {where} ({type(module).__name__}): only token-choice MoE layers are handled"
            )
        router = module.router
        if not isinstance(router, _ROUTERS):
            handled = ", ".join(kind.__name__ for kind in _ROUTERS)
            raise UnsupportedModelError(
                f"{owner}: cannot compress {where}: its router {type(router).__name__} is not one whose per-expert "
                f"tensors are known ({handled} and their subclasses)"
            )
        if isinstance(router, TopKRouter) and router.allowed_experts is not None:
            raise UnsupportedModelError(
                f"{owner}: cannot compress {where}: its router has per-modality expert pools (modality_experts), "
                "sets of expert indices the family's arguments cannot express once experts are removed or merged"
            )
        if isinstance(router, TopKRouter) and router.num_groups is not None:
            raise UnsupportedModelError(
                f"{owner}: cannot compress {where}: device-limited routing (num_groups={router.num_groups}) groups "
                "the experts by their position; removing experts would regroup them"
            )
        if type(module.experts) is not Experts:
            sharded = isinstance(module.experts, ShardedExperts)
            hint = "gather them first (mome.layers.unshard_experts)" if sharded else "stacked mome.layers.Experts"
            raise UnsupportedModelError(
                f"{owner}: cannot compress {where}: its experts are a {type(module.experts).__name__}; {hint}"
            )
        layers.append((name, module))
    if not layers:
        raise UnsupportedModelError(f"{owner}: {type(model).__name__} has no MoE layer to compress")
    return layers


def _run_batches(model: nn.Module, data: Any, owner: str) -> None:
    """Run ``model`` on ``data``: a tensor (one batch), a callable ``fn(model)`` that runs the forward passes
    itself, or an iterable of batches, each a tensor (``model(x)``), a tuple or list (``model(*batch)``) or a
    mapping (``model(**batch)``)."""
    expected = "a tensor, an iterable of batches (tensors, tuples or mappings) or a callable fn(model)"
    if isinstance(data, Tensor):
        model(data)
        return
    if callable(data) and not isinstance(data, Iterable):
        data(model)
        return
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, Mapping)):
        raise InvalidArgumentError("data", expected, type(data).__name__, owner)
    for batch in data:
        if isinstance(batch, Tensor):
            model(batch)
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        elif isinstance(batch, Mapping):
            model(**batch)
        else:
            raise InvalidArgumentError("data", f"{expected}; a batch was", type(batch).__name__, owner)


def expert_usage(model: nn.Module, data: Any) -> dict[str, ExpertUsage]:
    """Run ``model`` (in eval mode, without gradients) on the calibration ``data`` and count, per MoE layer, how
    often the router chose each expert, with the Gram matrix of its router logits (:class:`ExpertUsage`).

    Args:
        model: a model with token-choice MoE layers (see the module docstring for what is refused).
        data: a tensor (one batch), an iterable of batches (each a tensor, a tuple of positional arguments or a
            mapping of keyword arguments of ``model``), or a callable ``fn(model)`` that runs the forward passes.

    Returns:
        ``{layer name: ExpertUsage}`` for every MoE layer (the name ``""`` when ``model`` is one layer).

    Raises:
        InvalidArgumentError: ``data`` of another kind, or data that routed no token through some layer.
    """
    owner = "expert_usage"
    layers = _compressible_layers(model, owner)
    usage = {name: ExpertUsage(torch.zeros(layer.num_experts, dtype=torch.float64), 0, None) for name, layer in layers}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(router: nn.Module, args: Any, routing: Routing) -> None:
            record = usage[name]
            chosen = routing.expert_index[~routing.dropped]  # [A] the router's kept choices
            record.counts += torch.bincount(chosen.reshape(-1).cpu(), minlength=record.num_experts).double()
            record.tokens += routing.expert_index.shape[0]
            if routing.router_logits is not None:
                logits = routing.router_logits.detach().double().cpu()  # [T, E]
                gram = logits.t() @ logits  # [E, E]
                record.logit_gram = gram if record.logit_gram is None else record.logit_gram + gram

        return hook

    handles = [layer.router.register_forward_hook(hook_for(name)) for name, layer in layers]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            _run_batches(model, data, owner)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    empty = [name for name, record in usage.items() if record.tokens == 0]
    if empty:
        raise InvalidArgumentError(
            "data", "batches that route at least one token through every MoE layer", empty, owner
        )
    return usage


def _usage_for(
    model: nn.Module, layers: Sequence[tuple[str, MoE]], data: Any, usage: Mapping[str, ExpertUsage] | None, owner: str
) -> Mapping[str, ExpertUsage]:
    """``usage`` checked against ``layers`` (one record of the right size per layer), or measured on ``data``."""
    if usage is None:
        if data is None:
            expected = "calibration batches (or usage= from mome.compress.expert_usage) to rank the experts"
            raise InvalidArgumentError("data", expected, None, owner)
        return expert_usage(model, data)
    if not isinstance(usage, Mapping):
        raise InvalidArgumentError("usage", "a mapping {layer name: ExpertUsage}", type(usage).__name__, owner)
    for name, layer in layers:
        record = usage.get(name)
        if not isinstance(record, ExpertUsage) or record.num_experts != layer.num_experts:
            expected = f"an ExpertUsage of {layer.num_experts} experts for layer {name!r}"
            raise InvalidArgumentError(f"usage[{name!r}]", expected, record, owner)
    return usage


def _most_used(counts: Tensor, count: int) -> list[int]:
    """The ``count`` experts with the largest counts (ties: the lower index first), in index order."""
    order = sorted(range(counts.shape[0]), key=lambda e: (-float(counts[e]), e))
    return sorted(order[:count])


# ------------------------------------------------------------------------------------------------ weight matching
def _hidden_unit_features(experts: Experts, expert: int) -> Tensor:
    """``[H, F]`` float64: for each hidden unit of ``expert`` every weight tied to it, the input rows (the gate and
    the up row for gated experts), their biases and the output column: what weight matching compares."""
    w_in = experts.w_in[expert].detach().double()  # [H or 2H, D]
    halves = list(w_in.chunk(2)) if experts.gated else [w_in]  # each [H, D]
    parts = halves
    if experts.b_in is not None:
        b_in = experts.b_in[expert].detach().double()  # [H or 2H]
        parts = parts + [b.unsqueeze(-1) for b in (b_in.chunk(2) if experts.gated else [b_in])]  # each [H, 1]
    parts.append(experts.w_out[expert].detach().double().t())  # [D, H] -> [H, D]
    return torch.cat(parts, dim=1)


def match_hidden_units(experts: Experts, reference: int, other: int) -> Tensor:
    """The permutation ``p [H]`` of expert ``other``'s hidden units that best matches expert ``reference``'s:
    ``p = argmax_P sum_a <u_ref[a], u_other[P(a)]>`` over permutations, where ``u[a]`` concatenates every weight of
    hidden unit ``a`` (input rows, gate and up rows of gated experts, input biases, the output column). This is
    the linear assignment MC-SMoE's weight matching solves (``scipy.optimize.linear_sum_assignment``); hidden unit
    ``a`` of the aligned expert is unit ``p[a]`` of ``other`` (:func:`permute_hidden_units`), which computes the same
    function as ``other``. A permuted copy of ``reference`` is matched back exactly."""
    from scipy.optimize import linear_sum_assignment

    for name, index in (("reference", reference), ("other", other)):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < experts.num_experts:
            raise InvalidArgumentError(
                name, f"an expert index in [0, {experts.num_experts})", index, "match_hidden_units"
            )
    score = _hidden_unit_features(experts, reference) @ _hidden_unit_features(experts, other).t()  # [H, H]
    rows, columns = linear_sum_assignment(score.numpy(), maximize=True)
    return torch.as_tensor(columns[rows.argsort()], dtype=torch.long)


def permute_hidden_units(experts: Experts, expert: int, permutation: Tensor) -> dict[str, Tensor]:
    """Expert ``expert``'s weights with its hidden units reordered (unit ``a`` of the result is unit
    ``permutation[a]``): ``{"w_in" [H', D], "w_out" [D, H], "b_in" [H'], "b_out" [D]}`` (biases when present). Gated
    experts permute their gate and up rows together. The permuted expert computes the same function."""
    hidden = experts.hidden_dim
    if not isinstance(permutation, Tensor) or not torch.equal(permutation.sort().values.cpu(), torch.arange(hidden)):
        raise InvalidArgumentError(
            "permutation", f"a permutation of range({hidden})", permutation, "permute_hidden_units"
        )
    index = permutation.to(experts.w_in.device)
    rows = torch.cat([index, index + hidden]) if experts.gated else index  # [H']: gate rows then up rows
    weights = {"w_in": experts.w_in[expert].detach()[rows], "w_out": experts.w_out[expert].detach()[:, index]}
    if experts.b_in is not None:
        weights["b_in"] = experts.b_in[expert].detach()[rows]
        weights["b_out"] = experts.b_out[expert].detach().clone()
    return weights


# ------------------------------------------------------------------------------------------------ editing a layer
def _slice_rows(module: nn.Module, name: str, index: Tensor) -> None:
    """Replace ``module.<name>`` (a parameter or buffer whose axis 0 is the experts) by its rows ``index``."""
    value = getattr(module, name)
    if value is None:
        return
    rows = value.detach()[index.to(value.device)].clone()
    if isinstance(value, nn.Parameter):
        setattr(module, name, nn.Parameter(rows, requires_grad=value.requires_grad))
    else:
        setattr(module, name, rows)


def _keep_experts(layer: MoE, index: Tensor) -> None:
    """Keep the experts ``index`` (``[E']``, in that order) of ``layer``: the experts' stacked weights, the router's
    gate rows (and bias) or expert embeddings, and the per-expert buffers of the top-k routers."""
    experts, router = layer.experts, layer.router
    for name in ("w_in", "w_out", "b_in", "b_out"):
        _slice_rows(experts, name, index)
    experts.num_experts = index.numel()
    if isinstance(router, XMoERouter):
        _slice_rows(router, "expert_embeddings", index)
    else:  # an nn.Linear(D, E) gate: rows are experts
        _slice_rows(router.proj, "weight", index)
        _slice_rows(router.proj, "bias", index)
        router.proj.out_features = index.numel()
    if isinstance(router, TopKRouter):
        _slice_rows(router, "expert_bias", index)  # DeepSeek-V3's balancing bias [E]
        _slice_rows(router, "expert_load", index)  # its load counts [E]
    router.num_experts = index.numel()
    layer.last_routing_stats, layer.last_aux_losses = {}, {}


def _check_recorded_args(model: nn.Module, layers: Sequence[tuple[str, MoE]], sizes: Mapping[str, int], owner: str):
    """The ``model_args`` value ``num_experts`` that rebuilds the compressed model, or None when nothing is recorded;
    refuses a result the family's arguments cannot express (before anything changes)."""
    if not isinstance(getattr(model, "mome_model_args", None), dict):
        return None
    arch = getattr(model, "mome_model_name", type(model).__name__)
    if len(set(sizes.values())) > 1:
        raise UnsupportedModelError(
            f"{owner}: {arch}'s model_args give every MoE layer one num_experts, but the layers would have "
            f"{dict(sizes)} experts; give every layer the same count"
        )
    count = next(iter(sizes.values()))
    segments = {getattr(layer, "fine_grained", 1) for _, layer in layers}
    if len(segments) > 1 or count % max(segments):
        raise UnsupportedModelError(
            f"{owner}: {arch}'s MoE layers split each of num_experts experts into {sorted(segments)} fine-grained "
            f"experts (DeepSeekMoE); {count} experts is not a multiple of that, so model_args cannot rebuild it"
        )
    return count // max(segments)


def _record_num_experts(model: nn.Module, num_experts: int | None) -> None:
    """Write the new ``num_experts`` where the model records it: ``mome_model_args`` (what ``save_pretrained``
    writes) and a transformers ``config.num_experts`` (MoE-LLaVA)."""
    if num_experts is None:
        return
    model.mome_model_args["num_experts"] = num_experts
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_experts"):
        config.num_experts = num_experts


def _check_count(name: str, value: object, layer_name: str, layer: MoE, owner: str) -> None:
    """``value`` (``keep`` or ``num_groups``) is an integer in ``[top_k, E]`` of the layer."""
    check_int(name, value, owner=owner)
    top_k, num_experts = layer.router.top_k, layer.num_experts
    if not top_k <= value <= num_experts:
        expected = (
            f"an integer in [top_k={top_k}, num_experts={num_experts}] for layer {layer_name!r} "
            "(the router chooses top_k distinct experts)"
        )
        raise InvalidArgumentError(name, expected, value, owner)


# ------------------------------------------------------------------------------------------------ pruning
def prune_experts(
    model: nn.Module,
    keep: int | Mapping[str, Sequence[int]],
    *,
    data: Any = None,
    usage: Mapping[str, ExpertUsage] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Expert pruning by routing frequency: every MoE layer keeps the ``keep`` experts its router chose most often
    on the calibration ``data`` (ties: the lower index), in their original order.

    ``y(x) = sum_{j<k} w_j(x) FFN_{e_j(x)}(x)`` then runs over the kept experts only: the router's rows of the removed
    experts are gone from its softmax. A router that renormalises its top-k weights (Mixtral, MoE-LLaVA) computes the
    same output for a token none of whose choices was removed; one that does not (V-MoE's softmax weights) gives such
    a token weights larger by the removed experts' probability mass. An expert no token chooses (probability 0)
    leaves every output unchanged at dropless routing. With a capacity, each kept expert's capacity grows as
    ``ceil(c k T / E')``.

    Args:
        model: a model with token-choice MoE layers, or one :class:`~mome.layers.MoE`.
        keep: experts to keep per layer (``top_k <= keep <= E``), or ``{layer name: expert indices}`` naming every
            MoE layer (no calibration then).
        data: calibration batches for :func:`expert_usage` (when ``keep`` is a count and ``usage`` is not given).
        usage: the routing counts of :func:`expert_usage`, instead of ``data``.
        inplace: compress ``model`` itself; by default a deep copy is compressed and ``model`` is left as it was.

    Returns:
        the compressed model, with ``num_experts`` updated in its recorded ``model_args`` (and a transformers
        config), so :func:`mome.save_pretrained` writes a folder ``mome.create_model("local-dir:...")`` rebuilds.
    """
    owner = "prune_experts"
    layers = _compressible_layers(model, owner)
    kept: dict[str, list[int]] = {}
    if isinstance(keep, Mapping):
        names = [name for name, _ in layers]
        if set(keep) != set(names):
            raise InvalidArgumentError("keep", f"a mapping naming every MoE layer {names}", sorted(keep), owner)
        for name, layer in layers:
            indices = keep[name]
            valid = isinstance(indices, Sequence) and not isinstance(indices, (str, bytes))
            valid = valid and all(isinstance(e, int) and not isinstance(e, bool) for e in indices)
            if not valid or len(set(indices)) != len(indices) or any(not 0 <= e < layer.num_experts for e in indices):
                expected = f"distinct expert indices in [0, {layer.num_experts})"
                raise InvalidArgumentError(f"keep[{name!r}]", expected, indices, owner)
            _check_count(f"len(keep[{name!r}])", len(indices), name, layer, owner)
            kept[name] = sorted(indices)
    else:
        for name, layer in layers:
            _check_count("keep", keep, name, layer, owner)
        usage = _usage_for(model, layers, data, usage, owner)
        kept = {name: _most_used(usage[name].counts, keep) for name, _ in layers}
    num_experts = _check_recorded_args(model, layers, {name: len(indices) for name, indices in kept.items()}, owner)
    target = model if inplace else copy.deepcopy(model)
    for name, layer in _compressible_layers(target, owner):
        _keep_experts(layer, torch.tensor(kept[name], dtype=torch.long))
    _record_num_experts(target, num_experts)
    return target


# ------------------------------------------------------------------------------------------------ merging
def _groups(record: ExpertUsage, num_groups: int, owner: str, layer_name: str) -> dict[int, list[int]]:
    """MC-SMoE's grouping: ``{dominant expert: [dominant, members...]}``, dominant experts in index order."""
    dominant = _most_used(record.counts, num_groups)
    groups = {centre: [centre] for centre in dominant}
    others = [e for e in range(record.num_experts) if e not in groups]
    if others:
        if record.logit_gram is None:
            expected = f"router logits for layer {layer_name!r} (its router records none to group the experts by)"
            raise InvalidArgumentError("usage", expected, None, owner)
        similarity = record.similarity()
        for expert in others:
            scores = similarity[expert, dominant]  # [G]
            groups[dominant[int(scores.argmax())]].append(expert)  # ties: the first (lowest) dominant expert
    return groups


def _merged_weights(experts: Experts, members: Sequence[int], counts: Tensor) -> dict[str, Tensor]:
    """One expert from ``members`` (the dominant expert first): each member's hidden units aligned to the dominant
    expert's (:func:`match_hidden_units`), then ``theta = sum_i c_i theta_i / sum_i c_i`` (frequency-weighted
    averaging; the plain mean when no member was chosen)."""
    weights = counts[list(members)].double()  # [n]
    weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(weights, 1.0 / len(members))
    merged: dict[str, Tensor] = {}
    for weight, expert in zip(weights.tolist(), members):
        permutation = match_hidden_units(experts, members[0], expert) if expert != members[0] else None
        aligned = permute_hidden_units(
            experts, expert, torch.arange(experts.hidden_dim) if permutation is None else permutation
        )
        for name, value in aligned.items():
            term = weight * value.double()
            merged[name] = term if name not in merged else merged[name] + term
    return merged


def merge_experts(
    model: nn.Module,
    num_groups: int,
    *,
    data: Any = None,
    usage: Mapping[str, ExpertUsage] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """MC-SMoE's expert merging (Li et al. 2023, arXiv:2310.01334, sec. 3.1-3.2): every MoE layer's ``E`` experts
    become ``G = num_groups`` merged experts.

    1. Dominant experts: the ``G`` experts with the largest routing counts ``c_e`` on the calibration ``data``
       (ties: the lower index).
    2. Grouping: every other expert ``j`` joins the dominant expert ``i`` with the largest cosine similarity of
       router logits ``S[i, j] = <L[:, i], L[:, j]> / (|L[:, i]| |L[:, j]|)``, ``L [T, E]`` the calibration tokens'
       logits (:meth:`ExpertUsage.similarity`).
    3. Alignment: each member's hidden units are permuted to match the dominant expert's by weight matching
       (:func:`match_hidden_units`; gate and up rows together for gated experts).
    4. Merging: ``theta_g = sum_{e in g} c_e theta_e / sum_{e in g} c_e`` for every expert tensor (``W_in``,
       ``b_in``, ``W_out``, ``b_out``) of the aligned members.

    The router keeps the dominant expert's row (gate row and bias, X-MoE's expert embedding, DeepSeek-V3's balancing
    bias) for each merged expert: a token whose top-k choice was a dominant expert reaches that group's merged expert.
    MC-SMoE's reference code instead keeps all ``E`` router rows and binds every member of a group to the merged
    expert; a layer of ``G`` stacked experts has ``G`` router rows, so here the members' rows are dropped and a token
    that chose a member goes to its next kept choices. Merging experts that are all equal, under a router that
    renormalises its top-k weights and dropless routing, leaves the output unchanged; ``G = E`` changes nothing.

    Args:
        model: a model with token-choice MoE layers, or one :class:`~mome.layers.MoE`.
        num_groups: ``G``, merged experts per layer (``top_k <= G <= E``).
        data: calibration batches for :func:`expert_usage` (see there for the forms accepted).
        usage: the routing counts and logit Gram matrices of :func:`expert_usage`, instead of ``data``.
        inplace: compress ``model`` itself; by default a deep copy is compressed and ``model`` is left as it was.

    Returns:
        the compressed model, ``num_experts = G`` recorded as :func:`prune_experts` does.
    """
    owner = "merge_experts"
    layers = _compressible_layers(model, owner)
    for name, layer in layers:
        _check_count("num_groups", num_groups, name, layer, owner)
    usage = _usage_for(model, layers, data, usage, owner)
    groups = {name: _groups(usage[name], num_groups, owner, name) for name, _ in layers}
    num_experts = _check_recorded_args(model, layers, {name: len(g) for name, g in groups.items()}, owner)
    target = model if inplace else copy.deepcopy(model)
    for name, layer in _compressible_layers(target, owner):
        experts = layer.experts
        merged = {
            centre: _merged_weights(experts, members, usage[name].counts) for centre, members in groups[name].items()
        }
        with torch.no_grad():
            for centre, weights in merged.items():
                for tensor_name, value in weights.items():
                    getattr(experts, tensor_name)[centre].copy_(value)
        _keep_experts(layer, torch.tensor(sorted(groups[name]), dtype=torch.long))
    _record_num_experts(target, num_experts)
    return target
