"""Routing analysis of an MoE model over a whole evaluation set (the V-MoE and LIMoE papers' figures).

:class:`RoutingRecorder` puts forward hooks on every MoE layer of a model (it does not change the layers)
and *counts*, over every forward pass until it is detached, per layer ``l``, modality ``m`` and expert ``e``:

- ``kept[l, m, e]``: assignments of tokens of modality ``m`` that expert ``e`` computed (after capacity),
  read from the ``Routing`` record the layer hands to its experts (a pre-hook on ``MoE.experts``);
- ``requested[l, m]``: assignments the router asked for (a hook on ``MoE.router``), ``tokens[l, m]``, the
  tokens no expert computed, and ``sum_t H(p_t)`` with ``H(p) = -sum_e p_e log p_e`` (nats) the entropy of
  the clean router probabilities of token ``t``;
- with the labels of the batch (:meth:`RoutingRecorder.labels`), ``per_class[l, c, e]``: the assignments
  of the image tokens (modality 0, or a model without modality ids) of the images of class ``c`` to
  expert ``e`` (the image tokens of a batch are sample-major, ``[B * N]``, in every mome model).

The report then gives shares of the whole set, not of the last batch:

    expert_load[l, m, e]  = kept[l, m, e] / sum_e' kept[l, m, e']
    dropped_fraction[l, m] = 1 - sum_e kept[l, m, e] / requested[l, m]
    router_entropy[l, m]  = sum_t H(p_t) / tokens[l, m]
    class_share[l, c, e]  = per_class[l, c, e] / sum_e' per_class[l, c, e']

The routers of transformers' MoE VLMs (:mod:`mome.models.hf_moe_vlm`: Qwen3-VL-MoE, ERNIE-4.5-VL, GLM-4.5V,
Llama 4, Aria, Qwen3-Omni) are counted the same way, one "layer" per router module (named by its module name):
:meth:`RoutingRecorder.attach` turns on their routing capture (:mod:`mome.layers.hf_routing`, unless it is on
already) and reads each router call's ``Routing`` record, whose modality ids (0 image, 1 text, 2 video,
3 audio) come from the processor's token types or the placeholder ids. They drop nothing: ``kept`` equals
``requested``.

The MoE layers of MoE-LLaVA and Uni-MoE get no modality ids; inside :meth:`RoutingRecorder.token_modalities`
(``eval_task=vqa``, one prompt at a time) the call over the whole prompt takes the prompt's ids (the model's
``token_modality_ids``: image and audio placeholders, text) and the decoding steps are text, in rows named by the
model's ``modality_names``.

Soft MoE layers (Puigcerver et al. 2023) route no token to one expert: their ``expert_load`` is each
expert's share of the token outputs (the combine weights summed over its slots, averaged over tokens),
weighted by the tokens of each forward pass; they have no drop, entropy or per-class counts.

Counts are tensors, so the evaluation task sums them over processes (``trainer.strategy.reduce``) once
at the end. :func:`write_routing_report` saves ``routing.json`` plus ``routing_heatmap.png`` (experts x
layers, one panel per modality, :func:`mome.lit.callbacks.routing_heatmap`) and
``routing_per_class.png`` (classes x experts per MoE layer, as LIMoE's Fig. 6 and V-MoE's Fig. 8).

Patch routing maps (the V-MoE and LIMoE papers' per-image figures): inside
:meth:`RoutingRecorder.capture_patches` (``mome-eval`` wraps the forward passes of the first ``routing_maps``
images of the evaluated split), the same hooks also keep, per image and MoE layer, the expert of every
image patch as a ``[H_p, W_p]`` grid (the patch grid, row-major as ``PatchEmbed`` flattens it):

- token-choice layers: among the token's *computed* assignments (after capacity) the one with the largest
  combine weight, i.e. its first choice unless that was dropped; ``-1`` when no expert computed the token
  (dropped). The image tokens of the call are those of modality 0 (or all, without modality ids), sample-major;
  each image's leading ``n - H_p W_p`` tokens are its prefix (the CLS token of a timm ViT or VLMo; none in
  LIMoE) and are left out. With ``token_positions`` (MoE-LLaVA: the image placeholders in the LLM
  sequence) the patches are read at those positions of the call that routes the whole prompt (not the
  decoding steps);
- Soft MoE layers: the expert whose slots give the largest share of the token's output (the combine weights
  summed over each expert's slots, the quantity their ``expert_load`` averages); they never drop.

:func:`write_routing_report` saves them as ``routing_patches.json`` and ``routing_patch_map.png`` (rows =
images, columns = the image then one panel per MoE layer, a colour per expert, black = dropped).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.hf_routing import CHILD_NAME, MODALITY_NAMES, CapturedRouting
from ..layers.moe import MoE
from ..layers.routers import Routing
from ..layers.soft_moe import SoftMoE
from .callbacks import routing_heatmap

__all__ = [
    "PatchMap",
    "RoutingRecorder",
    "expert_preference_plot",
    "patch_map_plot",
    "patch_map_report",
    "top_assignment",
    "write_routing_report",
]


class _LayerCounts:
    """The counts of one MoE layer (see the module docstring); all tensors sum across processes."""

    def __init__(self, kind: str, num_experts: int, num_modalities: int, num_classes: int) -> None:
        self.kind = kind
        self.kept = torch.zeros(num_modalities, num_experts, dtype=torch.float64)  # [M, E]
        self.requested = torch.zeros(num_modalities, dtype=torch.float64)  # [M]
        self.tokens = torch.zeros(num_modalities, dtype=torch.float64)  # [M]
        self.unrouted = torch.zeros(num_modalities, dtype=torch.float64)  # [M]
        self.entropy = torch.zeros(num_modalities, dtype=torch.float64)  # [M]
        self.per_class = torch.zeros(num_classes, num_experts, dtype=torch.float64)  # [C, E]

    def tensors(self) -> dict[str, Tensor]:
        return {
            name: getattr(self, name) for name in ("kept", "requested", "tokens", "unrouted", "entropy", "per_class")
        }


@dataclass
class PatchMap:
    """The routing of one image's patches (see the module docstring).

    Attributes:
        index: the image's index in the evaluated dataset (None when not known).
        image: ``[C, H, W]``, the image as the model saw it (normalised).
        layers: per MoE layer, ``[H_p, W_p]`` int64: the expert of each patch, ``-1`` = dropped.
        prefix_tokens: per MoE layer, the image's leading non-patch tokens left out (CLS: 1).
    """

    index: int | None
    image: Tensor
    layers: dict[str, Tensor] = field(default_factory=dict)
    prefix_tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class _PatchCapture:
    """The images of the forward pass being captured and, per layer, their grids ``[B, H_p, W_p]``."""

    images: Tensor  # [B, C, H, W]
    grid: tuple[int, int]  # (H_p, W_p)
    indices: list[int | None]
    positions: Tensor | None = None  # [B, H_p * W_p]: the patches' positions among the call's tokens
    num_tokens: int | None = None  # the tokens of the call that holds them (the positions' call)
    maps: dict[str, Tensor] = field(default_factory=dict)
    prefix: dict[str, int] = field(default_factory=dict)

    def take(self, name: str, per_token: Tensor, image: Tensor | None) -> None:
        """Keep ``per_token [T]`` (a value per token of one MoE call) as layer ``name``'s grids, if this call
        holds the captured images' patches (``image [T]``: the image tokens; None: all)."""
        if name in self.maps:
            return  # the first call of the layer that fits (e.g. LIMoE's image stream runs first)
        batch, (height, width) = self.images.shape[0], self.grid
        patches = height * width
        if self.positions is not None:
            if per_token.numel() != self.num_tokens:
                return  # not the pass that routes the whole prompt (a decoding step)
            self.maps[name] = per_token[self.positions.to(per_token.device)].view(batch, height, width).cpu()
            self.prefix[name] = 0
            return
        tokens = per_token if image is None else per_token[image]  # [B * n], sample-major
        if batch == 0 or tokens.numel() % batch or tokens.numel() // batch < patches:
            return  # not these images' tokens (e.g. a text-only pass)
        per_image = tokens.numel() // batch
        self.maps[name] = tokens.view(batch, per_image)[:, per_image - patches :].reshape(batch, height, width).cpu()
        self.prefix[name] = per_image - patches


def top_assignment(routing: Routing) -> Tensor:
    """``[T]``: per token, the computed assignment with the largest combine weight (its first choice unless
    that was dropped), ``-1`` where no expert computed the token."""
    kept = ~routing.dropped  # [T, k]
    weights = routing.combine_weights.float().masked_fill(~kept, float("-inf"))  # [T, k]
    choice = weights.argmax(dim=-1, keepdim=True)  # [T, 1]
    expert = routing.expert_index.gather(-1, choice).squeeze(-1)  # [T]
    return torch.where(kept.any(dim=-1), expert, torch.full_like(expert, -1))


class RoutingRecorder:
    """Count the routing of every MoE layer of a model over many forward passes (see the module docstring).

    Args:
        num_classes: classes of the evaluation set (0: no per-class counts).
    """

    def __init__(self, num_classes: int = 0) -> None:
        self.num_classes = num_classes
        self.layers: dict[str, _LayerCounts] = {}
        self._handles: list[Any] = []
        self._labels: Tensor | None = None
        self._capture: _PatchCapture | None = None
        self.patch_maps: list[PatchMap] = []
        self.enabled = True
        self._owned_capture: Any = None  # the routing capture attach() turned on (transformers' MoE VLMs)
        self.modality_names: tuple[str, ...] = MODALITY_NAMES
        self._token_modalities: tuple[Tensor, int] | None = None

    def attach(self, model: nn.Module) -> RoutingRecorder:
        """Hook every :class:`~mome.layers.MoE` and :class:`~mome.layers.SoftMoE` of ``model``, and the routers of a
        transformers MoE VLM (their routing capture is turned on here unless it is on already, and off again by
        :meth:`detach`). The modalities are named by the model's ``modality_names`` (LIMoE with audio: image,
        text, audio), else by mome's ids (:data:`mome.layers.hf_routing.MODALITY_NAMES`: image, text, video,
        audio)."""
        self.detach()
        self.modality_names = tuple(getattr(model, "modality_names", None) or MODALITY_NAMES)
        # a model whose MoE layers are not given modality ids (MoE-LLaVA, Uni-MoE) names its modalities for
        # token_modalities(): a row for each
        named = len(getattr(model, "modality_names", None) or ())
        for name, module in model.named_modules():
            if isinstance(module, MoE):
                num_modalities = max(module.num_modalities, named)
                counts = _LayerCounts("sparse", module.num_experts, num_modalities, self.num_classes)
                self._handles.append(module.router.register_forward_hook(self._router_hook(counts)))
                self._handles.append(module.experts.register_forward_pre_hook(self._experts_hook(counts, name)))
            elif isinstance(module, SoftMoE):
                counts = _LayerCounts("soft", module.num_experts, 1, 0)
                self._handles.append(module.register_forward_hook(self._soft_hook(counts, name)))
            else:
                continue
            self.layers[name] = counts
        self._attach_captured(model)
        return self

    def _attach_captured(self, model: nn.Module) -> None:
        """Count the routers a :mod:`mome.layers.hf_routing` capture records (a hook after the capture's own)."""
        if not self._captured_routers(model):
            from ..models import hf_moe_vlm

            if not hf_moe_vlm.is_hf_moe_vlm(model):
                return
            self._owned_capture = hf_moe_vlm.enable_routing_capture(model)
        for name, (router, record) in self._captured_routers(model).items():
            num_experts = int(getattr(router, "num_experts", 0) or router.weight.shape[0])
            counts = _LayerCounts("sparse", num_experts, record.num_modalities, self.num_classes)
            self._handles.append(router.register_forward_hook(self._captured_hook(counts, name, record)))
            self.layers[name] = counts

    @staticmethod
    def _captured_routers(model: nn.Module) -> dict[str, tuple[nn.Module, CapturedRouting]]:
        """``{router name: (router module, its capture record)}`` of the routers under a routing capture."""
        found = {}
        for name, module in model.named_modules():
            record = module._modules.get(CHILD_NAME)
            if isinstance(record, CapturedRouting):
                found[name] = (module, record)
        return found

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        capture, self._owned_capture = getattr(self, "_owned_capture", None), None
        if capture is not None:
            capture.remove()

    @contextmanager
    def labels(self, labels: Tensor | None) -> Iterator[None]:
        """Forward passes inside this context are the images of ``labels [B]`` (for per-class counts)."""
        self._labels = labels if self.num_classes else None
        try:
            yield
        finally:
            self._labels = None

    @contextmanager
    def capture_patches(
        self,
        images: Tensor,
        grid: tuple[int, int],
        indices: Sequence[int | None] | None = None,
        token_positions: Tensor | None = None,
        num_tokens: int | None = None,
        limit: int | None = None,
    ) -> Iterator[None]:
        """Forward passes inside this context see ``images [B, C, H, W]``, whose patch grid is ``grid``
        ``(H_p, W_p)``: keep the expert of every patch in every MoE layer (:attr:`patch_maps`, one
        :class:`PatchMap` per image, dataset ``indices``). ``token_positions [B, H_p * W_p]`` (with
        ``num_tokens``, the tokens of the call that holds them) place the patches among a layer's tokens,
        e.g. MoE-LLaVA's image placeholders; without them the image tokens are found by modality. Only the
        first ``limit`` images are kept (None: all)."""
        batch = images.shape[0]
        found = list(indices) if indices is not None else [None] * batch
        self._capture = _PatchCapture(images.detach().float().cpu(), tuple(grid), found, token_positions, num_tokens)
        try:
            yield
        finally:
            capture, self._capture = self._capture, None
            for b in range(batch if limit is None else min(batch, limit)):
                self.patch_maps.append(
                    PatchMap(
                        index=None if found[b] is None else int(found[b]),
                        image=capture.images[b],
                        layers={name: grid[b] for name, grid in capture.maps.items()},
                        prefix_tokens=dict(capture.prefix),
                    )
                )

    @contextmanager
    def token_modalities(self, modality_ids: Tensor, otherwise: int) -> Iterator[None]:
        """Router calls inside this context that carry no modality ids of their own take them from here: a call
        that routes ``modality_ids.numel()`` tokens (the pass over a whole prompt, e.g. MoE-LLaVA's and Uni-MoE's
        ``[L]`` prompt with its image and audio placeholders) those ids, any other call (a decoding step of
        ``generate`` with the KV cache) modality ``otherwise`` for every token (the generated text)."""
        previous, self._token_modalities = self._token_modalities, (modality_ids.reshape(-1).long().cpu(), otherwise)
        try:
            yield
        finally:
            self._token_modalities = previous

    def _modality_of(self, routing: Routing, num_tokens: int) -> Tensor:
        """``[T]`` modality ids of a router call's tokens: its own, else those of :meth:`token_modalities`, else
        0 for every token (a model without modalities)."""
        if routing.modality_ids is not None:
            return routing.modality_ids.long().cpu()
        if self._token_modalities is not None:
            ids, otherwise = self._token_modalities
            return ids if ids.numel() == num_tokens else torch.full((num_tokens,), otherwise, dtype=torch.long)
        return torch.zeros(num_tokens, dtype=torch.long)

    @contextmanager
    def paused(self, pause: bool = True) -> Iterator[None]:
        """Forward passes inside this context are not counted (when ``pause``)."""
        enabled, self.enabled = self.enabled, self.enabled and not pause
        try:
            yield
        finally:
            self.enabled = enabled

    def reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Replace every count by ``reduce_sum(count)`` (the sum over processes)."""
        for counts in self.layers.values():
            for name, value in counts.tensors().items():
                setattr(counts, name, reduce_sum(value).to(value.dtype).cpu())

    # -- hooks -------------------------------------------------------------------------------------
    def _router_hook(self, counts: _LayerCounts) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, routing: Routing) -> None:
            if self.enabled:
                self._count_requested(counts, routing)

        return hook

    def _experts_hook(self, counts: _LayerCounts, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._count_kept(counts, name, args[1])

        return hook

    def _captured_hook(self, counts: _LayerCounts, name: str, record: CapturedRouting) -> Callable[..., None]:
        """After the capture's hook on the same router: its ``Routing`` of this call, counted once (the capture
        skips the calls it does not record, e.g. activation recomputation, leaving the last record in place)."""
        seen: list[Routing | None] = [None]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            routing = record.last_routing
            if routing is None or routing is seen[0]:
                return
            seen[0] = routing
            if self.enabled:
                self._count_requested(counts, routing)
            self._count_kept(counts, name, routing)

        return hook

    def _count_requested(self, counts: _LayerCounts, routing: Routing) -> None:
        """The router's side: tokens, requested assignments and router entropy, per modality."""
        with torch.no_grad():
            probs = routing.router_probs.float()  # [T, E]
            modality = self._modality_of(routing, probs.shape[0])
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).cpu().double()  # [T]
            requested = (~routing.dropped).sum(-1).cpu().double()  # [T]
            counts.tokens.index_add_(0, modality, torch.ones_like(entropy))
            counts.entropy.index_add_(0, modality, entropy)
            counts.requested.index_add_(0, modality, requested)

    def _count_kept(self, counts: _LayerCounts, name: str, routing: Routing) -> None:
        """The experts' side: computed assignments per modality and expert (and class), and the patch maps."""
        if self._capture is not None:
            with torch.no_grad():
                image = None if routing.modality_ids is None else routing.modality_ids == 0
                self._capture.take(name, top_assignment(routing), image)
        if not self.enabled:
            return
        with torch.no_grad():
            expert = routing.expert_index.cpu()  # [T, k]
            kept = (~routing.dropped).cpu().double()  # [T, k]
            num_tokens, top_k = expert.shape
            modality = self._modality_of(routing, num_tokens)
            counts.kept.index_put_((modality.repeat_interleave(top_k), expert.reshape(-1)), kept.reshape(-1), True)
            counts.unrouted.index_add_(0, modality, 1.0 - kept.amax(-1))
            if self._labels is not None:
                self._count_classes(counts, expert, kept, modality == 0)

    def _count_classes(self, counts: _LayerCounts, expert: Tensor, kept: Tensor, image: Tensor) -> None:
        labels = self._labels.cpu().long()
        num_images = labels.shape[0]
        num_image_tokens = int(image.sum())
        if num_images == 0 or num_image_tokens == 0 or num_image_tokens % num_images:
            return  # not this batch's images (e.g. a text-only pass)
        one_hot = torch.zeros(num_image_tokens, counts.per_class.shape[1], dtype=torch.float64)
        one_hot.scatter_add_(1, expert[image], kept[image])  # [T_img, E]: kept assignments per token
        per_image = one_hot.view(num_images, -1, one_hot.shape[1]).sum(1)  # [B, N, E] -> [B, E]
        counts.per_class.index_add_(0, labels, per_image)

    def _soft_hook(self, counts: _LayerCounts, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if self._capture is not None and self._capture.positions is None:
                tokens = args[0] if args[0].dim() == 3 else args[0][None]  # [B, M, D]
                if tokens.shape[0] == self._capture.images.shape[0]:
                    with torch.no_grad():
                        combine = module.routing_weights(tokens)[1].float()  # [B, M, E * P]
                        share = combine.view(*combine.shape[:2], module.num_experts, -1).sum(-1)  # [B, M, E]
                        self._capture.take(name, share.argmax(-1).reshape(-1), None)
            load = module.last_routing_stats.get("expert_load") if self.enabled else None
            if load is None:
                return
            num_tokens = float(output.shape[:-1].numel())
            counts.kept[0] += load.detach().double().cpu() * num_tokens
            counts.tokens[0] += num_tokens

        return hook

    # -- the report --------------------------------------------------------------------------------
    def drops(self) -> dict[str, Any]:
        """The dropped share of the routed assignments, over the whole set: overall (every token-choice layer
        together, ``1 - sum kept / sum requested``), per layer and per layer and modality (the ``routing`` field
        of ``results.json``)."""
        layers = {name: counts for name, counts in self.layers.items() if counts.kind == "sparse"}
        kept = sum((float(c.kept.sum()) for c in layers.values()), 0.0)
        requested = sum((float(c.requested.sum()) for c in layers.values()), 0.0)
        return {
            "dropped_fraction": 1.0 - kept / requested if requested > 0 else 0.0,
            "layers": {
                name: {
                    "dropped_fraction": _dropped(counts.kept.sum(), counts.requested.sum()),
                    "per_modality": {
                        _modality_name(m, self.modality_names): _dropped(counts.kept[m].sum(), counts.requested[m])
                        for m in range(counts.kept.shape[0])
                        if counts.tokens[m] > 0
                    },
                }
                for name, counts in layers.items()
            },
        }

    def report(self, classnames: Sequence[str] | None = None) -> dict[str, Any]:
        """Shares of the whole evaluation set per layer (and per modality and class); see the formulas above."""
        layers: dict[str, Any] = {}
        for name, counts in self.layers.items():
            kept, tokens = counts.kept, counts.tokens
            entry: dict[str, Any] = {
                "kind": counts.kind,
                "num_experts": int(kept.shape[1]),
                "tokens": int(tokens.sum()),
                "expert_load": _shares(kept.sum(0)),
            }
            if counts.kind == "sparse":
                entry.update(_drop_and_entropy(kept.sum(0), counts.requested.sum(), tokens.sum(), counts))
                entry["per_modality"] = {
                    _modality_name(m, self.modality_names): {
                        "tokens": int(tokens[m]),
                        "expert_load": _shares(kept[m]),
                        **_drop_and_entropy(kept[m], counts.requested[m], tokens[m], counts, m),
                    }
                    for m in range(kept.shape[0])
                    if tokens[m] > 0
                }
                if counts.per_class.numel() and counts.per_class.sum() > 0:
                    names = list(classnames or [str(c) for c in range(counts.per_class.shape[0])])
                    entry["per_class"] = {
                        "classnames": names,
                        "expert_share": [_shares(row) for row in counts.per_class],
                    }
            layers[name] = entry
        return {"layers": layers}


def _modality_name(m: int, names: Sequence[str] = MODALITY_NAMES) -> str:
    return names[m] if m < len(names) else f"modality_{m}"


def _shares(counts: Tensor) -> list[float]:
    total = float(counts.sum())
    return [float(v) / total if total > 0 else 0.0 for v in counts.tolist()]


def _dropped(kept: Tensor, requested: Tensor) -> float:
    return 1.0 - float(kept) / float(requested) if requested > 0 else 0.0


def _drop_and_entropy(
    kept: Tensor, requested: Tensor, tokens: Tensor, counts: _LayerCounts, m: int | None = None
) -> dict[str, float]:
    unrouted = counts.unrouted.sum() if m is None else counts.unrouted[m]
    entropy = counts.entropy.sum() if m is None else counts.entropy[m]
    return {
        "dropped_fraction": _dropped(kept.sum(), requested),
        "unrouted_fraction": float(unrouted) / float(tokens) if tokens > 0 else 0.0,
        "router_entropy": float(entropy) / float(tokens) if tokens > 0 else 0.0,
    }


def expert_preference_plot(report: dict[str, Any], title: str = "expert share of each class's image tokens") -> Any:
    """A matplotlib figure, one panel per MoE layer: rows = classes, columns = experts, colour = the share of
    the class's image-token assignments that went to the expert (LIMoE Fig. 6, V-MoE Fig. 8); ``None``
    when no layer has per-class counts."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = {name: entry["per_class"] for name, entry in report["layers"].items() if "per_class" in entry}
    if not layers:
        return None
    classnames = next(iter(layers.values()))["classnames"]
    fig, axes = plt.subplots(
        1, len(layers), figsize=(2.6 * len(layers) + 1.5, 0.28 * len(classnames) + 1.8), squeeze=False
    )
    for ax, (name, per_class) in zip(axes[0], layers.items()):
        image = ax.imshow(per_class["expert_share"], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(classnames)), labels=classnames if ax is axes[0][0] else [], fontsize=7)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.03)
    fig.suptitle(title, fontsize=9)
    return fig


def _patch_layers(maps: Sequence[PatchMap]) -> list[str]:
    names: dict[str, None] = {}
    for patch_map in maps:
        names.update(dict.fromkeys(patch_map.layers))
    return list(names)


def patch_map_report(maps: Sequence[PatchMap], report: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON of ``routing_patches.json``: per layer its kind, experts and the prefix tokens left out, and
    per image its dataset index and, per layer, the ``[H_p, W_p]`` grid of experts (``-1``: dropped)."""
    entries = (report or {}).get("layers", {})
    layers = {}
    for name in _patch_layers(maps):
        prefix = next(m.prefix_tokens[name] for m in maps if name in m.prefix_tokens)
        entry = entries.get(name, {})
        layers[name] = {"kind": entry.get("kind"), "num_experts": entry.get("num_experts"), "prefix_tokens": prefix}
    return {
        "value": "expert of each image patch (token-choice: the computed assignment with the largest combine "
        "weight; soft: the expert with the largest share of the token's output); -1: dropped",
        "layers": layers,
        "images": [
            {
                "index": m.index,
                "patch_grid": list(next(iter(m.layers.values())).shape) if m.layers else None,
                "layers": {name: grid.tolist() for name, grid in m.layers.items()},
            }
            for m in maps
        ],
    }


def _displayable(image: Tensor) -> Tensor:
    """``[C, H, W]`` (normalised) -> ``[H, W, 3]`` or ``[H, W]`` in [0, 1] (min-max over the image)."""
    image = image.float()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    if image.shape[0] == 1:
        return image[0]
    return image[:3].permute(1, 2, 0)


def patch_map_plot(maps: Sequence[PatchMap], num_experts: int, title: str = "expert of each image patch") -> Any:
    """A matplotlib figure: a row per image, the image then one panel per MoE layer whose patches are coloured
    by expert (black: dropped), with a legend (V-MoE's and LIMoE's per-image routing figures); ``None``
    without maps."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    layers = _patch_layers(maps)
    if not maps or not layers:
        return None
    num_experts = max(int(num_experts), 1)
    if num_experts <= 10:
        colours = list(plt.get_cmap("tab10").colors[:num_experts])
    elif num_experts <= 20:
        colours = list(plt.get_cmap("tab20").colors[:num_experts])
    else:
        colours = [plt.get_cmap("hsv")(e / num_experts) for e in range(num_experts)]
    cmap = ListedColormap(["black", *colours])  # value v -> colour v + 1 (-1: dropped)
    columns = 1 + len(layers)
    width, height = 1.25 * columns + 0.6, 1.25 * len(maps) + 0.9
    fig, axes = plt.subplots(len(maps), columns, figsize=(width, height), squeeze=False)
    dropped = False
    for row, patch_map in zip(axes, maps):
        row[0].imshow(_displayable(patch_map.image).numpy(), cmap="gray", interpolation="nearest")
        row[0].set_ylabel("image" if patch_map.index is None else f"#{patch_map.index}", fontsize=7)
        for ax, name in zip(row[1:], layers):
            grid = patch_map.layers.get(name)
            if grid is not None:
                dropped = dropped or bool((grid < 0).any())
                ax.imshow((grid + 1).numpy(), cmap=cmap, vmin=0, vmax=num_experts, interpolation="nearest")
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, name in zip(axes[0][1:], layers):
        ax.set_title(name, fontsize=7)
    handles = [Patch(color=colours[e], label=f"expert {e}") for e in range(num_experts)]
    if dropped:
        handles.append(Patch(color="black", label="dropped"))
    ncol = max(1, min(len(handles), int(width // 0.95)))
    legend_rows = -(-len(handles) // ncol)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9, y=1 - 0.08 / height, va="top")
    bottom = min(0.5, (0.2 * legend_rows + 0.1) / height)
    fig.subplots_adjust(left=0.3 / width, right=1 - 0.05 / width, bottom=bottom, top=1 - 0.55 / height)
    fig.subplots_adjust(wspace=0.08, hspace=0.08)
    return fig


def write_routing_report(
    report: dict[str, Any], folder: str | Path, patch_maps: Sequence[PatchMap] = ()
) -> dict[str, Path]:
    """Save ``routing.json``, ``routing_heatmap.png``, (with per-class counts) ``routing_per_class.png`` and
    (with ``patch_maps``) ``routing_patches.json`` and ``routing_patch_map.png`` in ``folder``; returns the
    paths written."""
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {"json": folder / "routing.json"}
    written["json"].write_text(json.dumps(report, indent=2) + "\n")
    load = {}
    for name, entry in report["layers"].items():
        per_modality = entry.get("per_modality")
        rows = [values["expert_load"] for values in per_modality.values()] if per_modality else [entry["expert_load"]]
        load[name] = torch.tensor(rows)  # [M, E]
    if load:
        modalities = next((list(e["per_modality"]) for e in report["layers"].values() if "per_modality" in e), [])
        named = ", ".join(f"{m}={name}" for m, name in enumerate(modalities))
        fig = routing_heatmap(load, title=f"expert load ({named})" if len(modalities) > 1 else "expert load")
        written["heatmap"] = folder / "routing_heatmap.png"
        fig.savefig(written["heatmap"], dpi=90)
        plt.close(fig)
    fig = expert_preference_plot(report)
    if fig is not None:
        written["per_class"] = folder / "routing_per_class.png"
        fig.savefig(written["per_class"], dpi=90)
        plt.close(fig)
    if patch_maps:
        header = {key: report[key] for key in ("model", "dataset", "task") if key in report}
        written["patches"] = folder / "routing_patches.json"
        written["patches"].write_text(json.dumps({**header, **patch_map_report(patch_maps, report)}) + "\n")
        experts = [report["layers"].get(name, {}).get("num_experts", 0) for name in _patch_layers(patch_maps)]
        experts += [int(grid.max()) + 1 for m in patch_maps for grid in m.layers.values() if grid.numel()]
        fig = patch_map_plot(patch_maps, max(experts, default=1))
        if fig is not None:
            written["patch_map"] = folder / "routing_patch_map.png"
            fig.savefig(written["patch_map"], dpi=90)
            plt.close(fig)
    return written
