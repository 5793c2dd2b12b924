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

Soft MoE layers (Puigcerver et al. 2023) route no token to one expert: their ``expert_load`` is each
expert's share of the token outputs (the combine weights summed over its slots, averaged over tokens),
weighted by the tokens of each forward pass; they have no drop, entropy or per-class counts.

Counts are tensors, so the evaluation task sums them over processes (``trainer.strategy.reduce``) once
at the end. :func:`write_routing_report` saves ``routing.json`` plus ``routing_heatmap.png`` (experts x
layers, one panel per modality, :func:`mome.lit.callbacks.routing_heatmap`) and
``routing_per_class.png`` (classes x experts per MoE layer, as LIMoE's Fig. 6 and V-MoE's Fig. 8).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.moe import MoE
from ..layers.routers import Routing
from ..layers.soft_moe import SoftMoE
from .callbacks import routing_heatmap

__all__ = ["RoutingRecorder", "expert_preference_plot", "write_routing_report"]

MODALITY_NAMES = ("image", "text")  # modality ids 0 and 1 of LIMoE and VLMo


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


def _modality_of(routing: Routing, num_tokens: int, device: torch.device) -> Tensor:
    if routing.modality_ids is not None:
        return routing.modality_ids.long()
    return torch.zeros(num_tokens, dtype=torch.long, device=device)


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
        self.enabled = True

    def attach(self, model: nn.Module) -> RoutingRecorder:
        """Hook every :class:`~mome.layers.MoE` and :class:`~mome.layers.SoftMoE` of ``model``."""
        self.detach()
        for name, module in model.named_modules():
            if isinstance(module, MoE):
                counts = _LayerCounts("sparse", module.num_experts, module.num_modalities, self.num_classes)
                self._handles.append(module.router.register_forward_hook(self._router_hook(counts)))
                self._handles.append(module.experts.register_forward_pre_hook(self._experts_hook(counts)))
            elif isinstance(module, SoftMoE):
                counts = _LayerCounts("soft", module.num_experts, 1, 0)
                self._handles.append(module.register_forward_hook(self._soft_hook(counts)))
            else:
                continue
            self.layers[name] = counts
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def labels(self, labels: Tensor | None) -> Iterator[None]:
        """Forward passes inside this context are the images of ``labels [B]`` (for per-class counts)."""
        self._labels = labels if self.num_classes else None
        try:
            yield
        finally:
            self._labels = None

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
            if not self.enabled:
                return
            with torch.no_grad():
                probs = routing.router_probs.float()  # [T, E]
                modality = _modality_of(routing, probs.shape[0], probs.device).cpu()
                entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).cpu().double()  # [T]
                requested = (~routing.dropped).sum(-1).cpu().double()  # [T]
                counts.tokens.index_add_(0, modality, torch.ones_like(entropy))
                counts.entropy.index_add_(0, modality, entropy)
                counts.requested.index_add_(0, modality, requested)

        return hook

    def _experts_hook(self, counts: _LayerCounts) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self.enabled:
                return
            routing: Routing = args[1]
            with torch.no_grad():
                expert = routing.expert_index.cpu()  # [T, k]
                kept = (~routing.dropped).cpu().double()  # [T, k]
                num_tokens, top_k = expert.shape
                modality = _modality_of(routing, num_tokens, expert.device).cpu()
                counts.kept.index_put_((modality.repeat_interleave(top_k), expert.reshape(-1)), kept.reshape(-1), True)
                counts.unrouted.index_add_(0, modality, 1.0 - kept.amax(-1))
                if self._labels is not None:
                    self._count_classes(counts, expert, kept, modality == 0)

        return hook

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

    def _soft_hook(self, counts: _LayerCounts) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
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
                        _modality_name(m): _dropped(counts.kept[m].sum(), counts.requested[m])
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
                    _modality_name(m): {
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


def _modality_name(m: int) -> str:
    return MODALITY_NAMES[m] if m < len(MODALITY_NAMES) else f"modality_{m}"


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


def write_routing_report(report: dict[str, Any], folder: str | Path) -> dict[str, Path]:
    """Save ``routing.json``, ``routing_heatmap.png`` and (with per-class counts) ``routing_per_class.png``
    in ``folder``; returns the paths written."""
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
    return written
