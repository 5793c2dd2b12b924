"""Lightning callbacks of mome: routing telemetry.

:class:`RoutingTelemetry` reads ``mome.routing_stats`` after a training batch every ``every_n_steps``
steps and logs, per MoE layer: each expert's share of the assignments (``routing/<layer>/load_e<k>``),
the dropped-assignment and unrouted-token fractions, the mean router entropy (nats) and the load-balance
coefficient of variation ``std(load) / mean(load)``; per modality where the layer saw modality ids. It
also renders the load as an experts x layers heat-map (one panel per modality, matplotlib) and hands it
to every logger that takes images (TensorBoard ``add_figure``) and saves it as a PNG under
``<log_dir>/routing/step_<N>.png``, as the V-MoE and LIMoE papers plot routing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ..layers.moe import routing_stats

__all__ = ["RoutingTelemetry", "routing_heatmap"]


def routing_heatmap(load: dict[str, Tensor], title: str = "expert load") -> Any:
    """A matplotlib figure: rows = MoE layers, columns = experts, colour = share of assignments.

    ``load`` maps layer name to ``[E]`` (one panel) or ``[M, E]`` (one panel per modality).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = list(load)
    per_layer = [v.float().cpu().reshape(-1, v.shape[-1]) for v in load.values()]  # [M, E] each
    num_panels = per_layer[0].shape[0]
    fig, axes = plt.subplots(1, num_panels, figsize=(3.2 * num_panels + 1, 0.4 * len(layers) + 1.5), squeeze=False)
    for m, ax in enumerate(axes[0]):
        width = max(v.shape[-1] for v in per_layer)
        grid = torch.full((len(layers), width), float("nan"))
        for row, values in enumerate(per_layer):
            grid[row, : values.shape[-1]] = values[min(m, values.shape[0] - 1)]
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(layers)), labels=layers, fontsize=7)
        ax.set_title(title if num_panels == 1 else f"{title}, modality {m}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig


class RoutingTelemetry(L.Callback):
    """Log routing statistics as scalars and a heat-map every ``every_n_steps`` training steps.

    Args:
        every_n_steps: logging period in global steps.
        heatmap: also render the heat-map (matplotlib) at the same period.
        heatmap_every_n_steps: heat-map period (default: ``every_n_steps``).
    """

    def __init__(self, every_n_steps: int = 50, heatmap: bool = True, heatmap_every_n_steps: int | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.routing_telemetry.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.heatmap = heatmap
        self.heatmap_every_n_steps = heatmap_every_n_steps or every_n_steps
        self.last_heatmap: Path | None = None

    @staticmethod
    def scalars(stats: dict[str, dict[str, Tensor]]) -> dict[str, float]:
        """Flatten ``mome.routing_stats`` into ``{"routing/<layer>/<stat>": value}``."""
        out: dict[str, float] = {}
        for layer, values in stats.items():
            prefix = f"routing/{layer}"
            load = values.get("expert_load")
            if load is not None:
                load = load.float()
                for e, share in enumerate(load.tolist()):
                    out[f"{prefix}/load_e{e}"] = share
                out[f"{prefix}/load_cv"] = float(load.std(unbiased=False) / load.mean().clamp_min(1e-12))
            for name in ("dropped_fraction", "unrouted_fraction", "router_entropy"):
                if name in values:
                    out[f"{prefix}/{name}"] = float(values[name])
            per_modality = values.get("expert_load_per_modality")
            if per_modality is not None:
                for m, row in enumerate(per_modality.float().tolist()):
                    for e, share in enumerate(row):
                        out[f"{prefix}/m{m}/load_e{e}"] = share
            for name in ("unrouted_fraction_per_modality", "router_entropy_per_modality"):
                if name in values:
                    for m, value in enumerate(values[name].float().tolist()):
                        out[f"{prefix}/m{m}/{name.removesuffix('_per_modality')}"] = value
        return out

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0 and step != 1:
            return
        stats = routing_stats(pl_module.model if hasattr(pl_module, "model") else pl_module)
        if not stats:
            return
        pl_module.log_dict(self.scalars(stats), on_step=True, on_epoch=False)
        if self.heatmap and (step % self.heatmap_every_n_steps == 0 or step == 1):
            # trainer.log_dir broadcasts under DDP: every rank must ask, not only the one that draws.
            folder = Path(trainer.log_dir or trainer.default_root_dir) / "routing"
            if trainer.is_global_zero:
                self._save_heatmap(trainer, stats, step, folder)

    def _save_heatmap(self, trainer: L.Trainer, stats: dict[str, dict[str, Tensor]], step: int, folder: Path) -> None:
        import matplotlib.pyplot as plt

        load = {
            layer: values.get("expert_load_per_modality", values["expert_load"])
            for layer, values in stats.items()
            if "expert_load" in values
        }
        if not load:
            return
        fig = routing_heatmap(load, title=f"expert load, step {step}")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("routing/expert_load", fig, global_step=step, close=False)
        folder.mkdir(parents=True, exist_ok=True)
        self.last_heatmap = folder / f"step_{step:06d}.png"
        fig.savefig(self.last_heatmap, dpi=80)
        plt.close(fig)
