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
forward pass are taken by a forward pre-hook on the top model (``modality_ids_of(args, kwargs) -> [B, T]``);
a router sees its tokens flattened ``[B * T, D]`` in that order, or a subset of them (``token_subset``: e.g.
ERNIE-4.5-VL's text and vision experts, each routing only its own tokens).

Capture is off unless asked for: without it no hook is installed and nothing runs (zero cost).
"""

from __future__ import annotations

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
    "RouterTap",
    "RoutingCapture",
    "capture_routing",
]

#: mome's modality ids of captured routing (0 and 1 as LIMoE, VLMo and the routing report name them)
MODALITY_NAMES = ("image", "text", "video", "audio")
CHILD_NAME = "routing"

#: ``decode(module, output) -> (router_logits [T, E], router_probs [T, E], expert_index [T, k], weights [T, k])``
Decoder = Callable[[nn.Module, Any], tuple[Tensor, Tensor, Tensor, Tensor]]


@dataclass
class RouterTap:
    """One router to hook: its module, how to read its output, and which of the forward's tokens it routes
    (``token_subset() -> bool [B * T]`` or None: all of them, in order)."""

    module: nn.Module
    decode: Decoder
    token_subset: Callable[[], Tensor | None] | None = None


class CapturedRouting(RoutedLayer):
    """The record of one hooked router: ``last_routing_stats`` as a mome MoE layer keeps it (no aux losses:
    the model computes its own). ``last_routing`` is the :class:`~mome.layers.Routing` of the last call."""

    def __init__(self, num_modalities: int) -> None:
        self._pending: tuple[Routing, Tensor] | None = None
        super().__init__()
        self.num_modalities = num_modalities
        self.last_routing: Routing | None = None

    def record(self, routing: Routing, requested: Tensor) -> None:
        """Keep one router call's routing; its statistics are computed when first read (the capture itself
        stays a few tensor conversions per call)."""
        self.last_routing = routing
        self._pending = (routing, requested)

    @property
    def last_routing_stats(self) -> dict[str, Tensor]:
        """The statistics of the last recorded call (:func:`~mome.layers.moe.routing_statistics`), as a mome
        :class:`~mome.layers.MoE` keeps them."""
        if self._pending is not None:
            routing, requested = self._pending
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
        modality_ids_of: Callable[[tuple, dict], Tensor | None],
        num_modalities: int,
    ) -> None:
        if not taps:
            raise InvalidArgumentError("taps", "at least one router module to hook", dict(taps), "capture_routing")
        self.model, self.num_modalities = model, num_modalities
        self.modality_ids: Tensor | None = None  # [B * T] of the current forward
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

    def _top_hook(self, modality_ids_of: Callable[[tuple, dict], Tensor | None]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = modality_ids_of(args, kwargs)
            self.modality_ids = None if ids is None else ids.reshape(-1).long()

        return hook

    def _router_hook(self, tap: RouterTap, record: CapturedRouting) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if recomputing():
                return
            with torch.no_grad():
                logits, probs, index, weights = tap.decode(module, output)
                modality = self.modality_ids
                if modality is not None and tap.token_subset is not None:
                    subset = tap.token_subset()
                    modality = modality[subset.reshape(-1).to(modality.device)] if subset is not None else modality
                if modality is not None and modality.numel() != index.shape[0]:
                    modality = None  # tokens the top model's inputs do not describe (e.g. given as embeddings)
                routing = Routing(
                    expert_index=index.long(),
                    combine_weights=weights.float(),
                    dropped=torch.zeros(index.shape, dtype=torch.bool, device=index.device),
                    router_probs=probs.float(),
                    router_logits=logits.float(),
                    modality_ids=None if modality is None else modality.to(index.device),
                )
                record.record(routing, index.new_tensor(index.numel(), dtype=torch.float32))

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
    modality_ids_of: Callable[[tuple, dict], Tensor | None],
    num_modalities: int = len(MODALITY_NAMES),
) -> Iterator[RoutingCapture]:
    """Hook the routers of ``taps`` (``{name: RouterTap}``) for the ``with`` block; the hooks go after it."""
    capture = RoutingCapture(model, taps, modality_ids_of, num_modalities)
    try:
        yield capture
    finally:
        capture.remove()
