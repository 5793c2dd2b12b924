"""Lightning callbacks of mome: routing telemetry, and the model summary with the MoE cost per sample.

:class:`RoutingTelemetry` reads ``mome.routing_stats`` (the statistics of the last forward pass) after the
training batch of every ``every_n_steps``-th step and writes them to the loggers *at that step* (one row of the
step's own values, rank 0's batch; nothing is carried to other steps). Per MoE layer:

- ``load_e<k>``: expert ``k``'s share of the computed assignments, ``p_k``;
- ``load_cv = std(p) / mean(p)``, ``load_max = max_k p_k``, ``load_min = min_k p_k`` (0: a dead expert);
- ``load_entropy = -sum_k p_k log p_k`` (nats, at most ``log E``): the entropy of the load, low when the routing
  collapsed onto few experts ([0, 0, .5, .5] gives ``log 2``);
- ``token_entropy``: the mean over tokens of the entropy of each token's router probabilities (how undecided the
  router is per token; it can be maximal while the load collapsed, so it is not the load's entropy);
- ``dropped_fraction`` (assignments dropped by capacity), ``unrouted_fraction`` (tokens no expert computed);

and the same per modality (``m<m>/...``) where the layer saw modality ids. A dead expert or a dropped fraction
above ``drop_warning`` prints a one-line warning (once, until it clears). The load is also drawn as an experts x
layers heat-map (one panel per modality, matplotlib), handed to every logger that takes images (TensorBoard
``add_figure``) and saved as a PNG under ``<log_dir>/routing/step_<N>.png``, as the V-MoE and LIMoE papers plot
routing.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ..layers.moe import routing_stats
from .expert_parallel import forward_is_collective

__all__ = ["MoEModelSummary", "RoutingTelemetry", "format_cost", "routing_heatmap"]


def format_cost(cost: dict[str, int]) -> str:
    """``active params 1.2 M of 3.4 M total (experts 2.9 M), active FLOPs 9.3 M per sample`` (see ``mome._flops``)."""
    from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count as count

    return (
        f"active params {count(cost['active_params'])} of {count(cost['total_params'])} total "
        f"(experts {count(cost['expert_params'])}), active FLOPs {count(cost['flops'])} per sample"
    )


class MoEModelSummary(L.pytorch.callbacks.RichModelSummary):
    """Lightning's (rich) model summary, whose "Total FLOPs" are one sample's (the task's ``example_input_array``),
    followed by one line with the MoE cost per sample: total and active parameters and the active FLOPs measured
    with dropless routing (:meth:`mome.lit.MomeTask.model_cost`, definitions in ``mome._flops``). The line is also
    in ``self.cost_line`` (rank 0)."""

    cost_line: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._max_depth == 0 or not trainer.is_global_zero or not hasattr(pl_module, "model_cost"):
            return
        if forward_is_collective(pl_module):  # rank 0 alone would wait for the others' all-to-all / all-gather
            print("MoE cost: not measured under expert parallelism or FSDP (mome-eval of the export reports it)")
            return
        self.cost_line = f"MoE cost: {format_cost(pl_module.model_cost())}"
        print(self.cost_line)


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


def _load_scalars(load: Tensor, prefix: str) -> dict[str, float]:
    """The load statistics of one share vector ``p [E]`` (see the module docstring)."""
    load = load.float()
    total = float(load.sum())
    shares = load / total if total > 0 else load
    nonzero = shares[shares > 0]
    out = {f"{prefix}/load_e{e}": share for e, share in enumerate(shares.tolist())}
    out[f"{prefix}/load_cv"] = float(shares.std(unbiased=False) / shares.mean().clamp_min(1e-12))
    out[f"{prefix}/load_max"] = float(shares.max())
    out[f"{prefix}/load_min"] = float(shares.min())
    out[f"{prefix}/load_entropy"] = float(-(nonzero * nonzero.log()).sum()) if total > 0 else 0.0
    return out


class RoutingTelemetry(L.Callback):
    """Log routing statistics of the logged step as scalars, and a heat-map, every ``every_n_steps`` training steps.

    Args:
        every_n_steps: logging period in global steps (and step 1).
        heatmap: also render the heat-map (matplotlib) at the same period.
        heatmap_every_n_steps: heat-map period (default: ``every_n_steps``).
        drop_warning: warn when a layer drops more than this fraction of its assignments (``None``: never).
        dead_expert_warning: warn when an expert of a layer computed no assignment at a logged step.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        heatmap: bool = True,
        heatmap_every_n_steps: int | None = None,
        drop_warning: float | None = 0.2,
        dead_expert_warning: bool = True,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.routing_telemetry.every_n_steps must be >= 1, got {every_n_steps}")
        if drop_warning is not None and not 0 <= drop_warning <= 1:
            raise ValueError(f"callbacks.routing_telemetry.drop_warning must be in [0, 1] or null, got {drop_warning}")
        self.every_n_steps = every_n_steps
        self.heatmap = heatmap
        self.heatmap_every_n_steps = heatmap_every_n_steps or every_n_steps
        self.drop_warning = drop_warning
        self.dead_expert_warning = dead_expert_warning
        self.last_heatmap: Path | None = None
        self.last_logged: dict[str, float] = {}
        self._warned: set[tuple[str, str]] = set()

    @staticmethod
    def scalars(stats: dict[str, dict[str, Tensor]]) -> dict[str, float]:
        """Flatten ``mome.routing_stats`` into ``{"routing/<layer>/<stat>": value}`` (see the module docstring)."""
        out: dict[str, float] = {}
        for layer, values in stats.items():
            prefix = f"routing/{layer}"
            if values.get("expert_load") is not None:
                out.update(_load_scalars(values["expert_load"], prefix))
            for name in ("dropped_fraction", "unrouted_fraction"):
                if name in values:
                    out[f"{prefix}/{name}"] = float(values[name])
            if "router_entropy" in values:
                out[f"{prefix}/token_entropy"] = float(values["router_entropy"])
            per_modality = values.get("expert_load_per_modality")
            if per_modality is not None:
                for m, row in enumerate(per_modality):
                    out.update(_load_scalars(row, f"{prefix}/m{m}"))
            if "unrouted_fraction_per_modality" in values:
                for m, value in enumerate(values["unrouted_fraction_per_modality"].float().tolist()):
                    out[f"{prefix}/m{m}/unrouted_fraction"] = value
            if "router_entropy_per_modality" in values:
                for m, value in enumerate(values["router_entropy_per_modality"].float().tolist()):
                    out[f"{prefix}/m{m}/token_entropy"] = value
        return out

    def warnings(self, stats: dict[str, dict[str, Tensor]], step: int) -> list[str]:
        """One line per layer with a dead expert or too many drops at ``step``, each new condition once (until it
        clears)."""
        lines = []
        for layer, values in stats.items():
            problems = []
            load = values.get("expert_load")
            dead = [] if load is None or float(load.sum()) == 0 else [e for e, v in enumerate(load.tolist()) if v == 0]
            if self.dead_expert_warning and dead and (layer, "dead") not in self._warned:
                self._warned.add((layer, "dead"))
                problems.append(f"expert{'s' if len(dead) > 1 else ''} {', '.join(map(str, dead))} computed no token")
            elif not dead:
                self._warned.discard((layer, "dead"))
            dropped = float(values["dropped_fraction"]) if "dropped_fraction" in values else 0.0
            too_many = self.drop_warning is not None and dropped > self.drop_warning
            if too_many and (layer, "drops") not in self._warned:
                self._warned.add((layer, "drops"))
                problems.append(f"dropped {100 * dropped:.1f}% of its assignments (> drop_warning={self.drop_warning})")
            elif not too_many:
                self._warned.discard((layer, "drops"))
            if problems:
                lines.append(f"routing warning at step {step}: {layer}: {'; '.join(problems)}")
        return lines

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0 and step != 1:
            return
        stats = routing_stats(pl_module.model if hasattr(pl_module, "model") else pl_module)
        if not stats:
            return
        if trainer.is_global_zero:
            # written at this step only (self.log would keep the values and repeat them at later logging steps)
            self.last_logged = {k: v for k, v in self.scalars(stats).items() if math.isfinite(v)}
            for logger in trainer.loggers:
                logger.log_metrics(self.last_logged, step=step)
            for line in self.warnings(stats, step):
                print(f"mome-train: {line}", file=sys.stderr)
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
