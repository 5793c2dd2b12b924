"""Routing capture for MoE blocks that are not mome's: forward hooks on another library's router modules.

transformers' MoE models (Qwen3-VL-MoE, ERNIE-4.5-VL-MoE, GLM-4.5V, Llama 4, Aria, Qwen3-Omni-MoE, ...)
route inside their own blocks; their routers are modules whose forward returns the router logits and the
chosen experts. :func:`capture_routing` hooks those modules (nothing in their code is patched) and turns
each call into the record a mome :class:`~mome.layers.MoE` keeps, through the same
:func:`~mome.layers.moe.routing_statistics`: while the capture is on, each hooked router holds a
:class:`CapturedRouting` child (a :class:`~mome.layers.RoutedLayer` without parameters), so
:func:`mome.routing_stats` returns ``{"<router name>.routing": {"expert_load": [E], ...}}`` for these models
as for mome's layers, with ``expert_load_per_modality [M, E]`` when the forward's tokens have modality ids.

Modality ids (mome's convention, :data:`MODALITY_NAMES`): 0 image, 1 text, 2 video, 3 audio. The ids of a
forward pass come from a forward pre-hook on the top model (``modality_ids_of(args, kwargs)``, which returns the
function computing them, ``() -> [B, T]``); a router sees its tokens flattened ``[B * T, D]`` in that order, or a
subset of them (``token_subset``: e.g. ERNIE-4.5-VL's text and vision experts, each routing only its own tokens).

Cost: capture is off unless asked for: without it no hook is installed and nothing runs. With it on, a router call
runs no tensor operation: the hook keeps references to the router's outputs, the forward's token ids and the
token subset; decoding them into a :class:`~mome.layers.Routing` (top-k, probabilities, dtype conversions,
modality lookup) and the statistics happen when :attr:`CapturedRouting.last_routing` or
:attr:`CapturedRouting.last_routing_stats` is read, for the last call only
(``tests/test_hf_moe_vlms.py::test_capture_runs_no_tensor_operation_in_the_forward``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import InvalidArgumentError
from .moe import RoutedLayer, recomputing, routing_statistics
from .routers import Routing

__all__ = [
    "MODALITY_NAMES",
    "CapturedRouting",
    "RouterCall",
    "RouterTap",
    "RoutingCapture",
    "capture_routing",
]

#: mome's modality ids of captured routing (0 and 1 as LIMoE, VLMo and the routing report name them)
MODALITY_NAMES = ("image", "text", "video", "audio")
CHILD_NAME = "routing"

#: ``decode(output, top_k) -> (router_logits [T, E], router_probs [T, E], expert_index [T, k], weights [T, k])``:
#: a router's output (and its ``top_k`` at the call) read back when the statistics are read
Decoder = Callable[[Any, "int | None"], tuple[Tensor, Tensor, Tensor, Tensor]]
#: a function evaluated when the statistics are read, giving a tensor or None
Deferred = Callable[[], "Tensor | None"]


@dataclass
class RouterTap:
    """One router to hook: its module, how to read its output, and which of the forward's tokens it routes.

    ``token_subset`` (None: all of the forward's tokens, in order) is called at each router call and must run no
    tensor operation: it returns the :data:`Deferred` function giving the routed tokens (bool ``[B * T]``, or None
    for all of them) when the statistics are read."""

    module: nn.Module
    decode: Decoder
    token_subset: Callable[[], Deferred] | None = None


@dataclass
class RouterCall:
    """What one router call left: references to its output, its ``top_k`` at the call, the forward's modality
    ids and the routed token subset (both :data:`Deferred`). :meth:`routing` decodes them."""

    decode: Decoder
    output: Any
    top_k: int | None
    modality_ids: Deferred | None
    token_subset: Deferred | None

    def routing(self) -> Routing:
        """The call's :class:`~mome.layers.Routing` (detached, fp32 probabilities and logits, int64 indices) with
        each token's modality, None when the forward's inputs do not describe the routed tokens (e.g. the model
        was given embeddings)."""
        with torch.no_grad():
            logits, probs, index, weights = self.decode(self.output, self.top_k)
            index = index.detach().long()
            modality = None if self.modality_ids is None else self.modality_ids()
            if modality is not None and self.token_subset is not None:
                subset = self.token_subset()
                modality = modality[subset.reshape(-1).to(modality.device)] if subset is not None else modality
            if modality is not None and modality.numel() != index.shape[0]:
                modality = None
            return Routing(
                expert_index=index,
                combine_weights=weights.detach().float(),
                dropped=torch.zeros(index.shape, dtype=torch.bool, device=index.device),
                router_probs=probs.detach().float(),
                router_logits=logits.detach().float(),
                modality_ids=None if modality is None else modality.to(index.device),
            )


class CapturedRouting(RoutedLayer):
    """The record of one hooked router: ``last_routing_stats`` as a mome MoE layer keeps it (no aux losses:
    the model computes its own). ``last_routing`` is the :class:`~mome.layers.Routing` of the last call. Both are
    computed from the last :class:`RouterCall` when first read (and kept until the next call)."""

    def __init__(self, num_modalities: int) -> None:
        self._pending: RouterCall | None = None  # the last call, until its statistics are computed
        self._routing: Routing | None = None
        super().__init__()
        self.num_modalities = num_modalities

    def record(self, call: RouterCall) -> None:
        """Keep one router call (references only: nothing is computed until a read)."""
        self._pending, self._routing = call, None

    @property
    def last_routing(self) -> Routing | None:
        """The :class:`~mome.layers.Routing` of the last recorded call (the same object on every read)."""
        if self._routing is None and self._pending is not None:
            self._routing = self._pending.routing()
        return self._routing

    @property
    def last_routing_stats(self) -> dict[str, Tensor]:
        """The statistics of the last recorded call (:func:`~mome.layers.moe.routing_statistics`), as a mome
        :class:`~mome.layers.MoE` keeps them."""
        if self._pending is not None:
            routing = self.last_routing
            requested = torch.tensor(float(routing.expert_index.numel()), device=routing.expert_index.device)
            self._pending = None
            self._stats = routing_statistics(routing, requested, self.num_modalities)
        return self._stats

    @last_routing_stats.setter
    def last_routing_stats(self, stats: dict[str, Tensor]) -> None:
        self._pending = None
        self._stats = stats

    def forward(self, *args: Any) -> None:  # pragma: no cover - a record, never called
        raise RuntimeError("CapturedRouting is a record of a hooked router, not a layer to call")


class RoutingCapture:
    """Hooks installed by :func:`capture_routing`; :meth:`remove` takes them (and the records) away."""

    def __init__(
        self,
        model: nn.Module,
        taps: Mapping[str, RouterTap],
        modality_ids_of: Callable[[tuple, dict], Deferred | None],
        num_modalities: int,
    ) -> None:
        if not taps:
            raise InvalidArgumentError("taps", "at least one router module to hook", dict(taps), "capture_routing")
        self.model, self.num_modalities = model, num_modalities
        self.modality_ids: Deferred | None = None  # () -> [B * T] of the current forward
        self.records: dict[str, CapturedRouting] = {}
        self._handles = [model.register_forward_pre_hook(self._top_hook(modality_ids_of), with_kwargs=True)]
        for name, tap in taps.items():
            if CHILD_NAME in tap.module._modules:
                raise InvalidArgumentError(
                    "taps",
                    f"router modules without a child named {CHILD_NAME!r} (hooked twice?)",
                    name,
                    "capture_routing",
                )
            record = CapturedRouting(num_modalities)
            tap.module.add_module(CHILD_NAME, record)
            self.records[name] = record
            self._handles.append(tap.module.register_forward_hook(self._router_hook(tap, record)))
        self._taps = dict(taps)

    def _top_hook(self, modality_ids_of: Callable[[tuple, dict], Deferred | None]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids_of = modality_ids_of(args, kwargs)
            self.modality_ids = None if ids_of is None else functools.cache(functools.partial(_flat_ids, ids_of))

        return hook

    def _router_hook(self, tap: RouterTap, record: CapturedRouting) -> Callable[..., None]:
        decode, token_subset = tap.decode, tap.token_subset

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if recomputing():
                return
            subset = None if token_subset is None else token_subset()
            record.record(RouterCall(decode, output, getattr(module, "top_k", None), self.modality_ids, subset))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for tap in self._taps.values():
            if isinstance(tap.module._modules.get(CHILD_NAME), CapturedRouting):
                delattr(tap.module, CHILD_NAME)
        self._taps = {}
        self.modality_ids = None


@contextmanager
def capture_routing(
    model: nn.Module,
    taps: Mapping[str, RouterTap],
    modality_ids_of: Callable[[tuple, dict], Deferred | None],
    num_modalities: int = len(MODALITY_NAMES),
) -> Iterator[RoutingCapture]:
    """Hook the routers of ``taps`` (``{name: RouterTap}``) for the ``with`` block; the hooks go after it.
    ``modality_ids_of(args, kwargs)`` is given the top model's inputs at each forward and returns, without tensor
    work, the :data:`Deferred` function giving their modality ids ``[B, T]`` (or None: no modality)."""
    capture = RoutingCapture(model, taps, modality_ids_of, num_modalities)
    try:
        yield capture
    finally:
        capture.remove()


def _flat_ids(ids_of: Deferred) -> Tensor | None:
    ids = ids_of()
    return None if ids is None else ids.reshape(-1).long()  # [B, T] -> [B * T]
