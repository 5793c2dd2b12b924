"""Every evaluation sample counted once under DDP, whatever the distributed sampler repeats.

Lightning's ``DistributedSampler`` pads the evaluation set by repeating samples so that every process
gets as many (PL #11479), which would count those samples twice in metrics, gathered features and
routing counts. At the start of the test epoch each process lists the dataset indices of its batches
(:func:`plan_batches`); the lists are gathered and a sample is kept only at its first place in the
padded order ``position * world_size + rank`` (:func:`first_occurrences`). The evaluation task then
removes the duplicates from each batch (:func:`select_samples`) before the model sees it, so the numbers
equal a single-process run once per-sample outputs are gathered and sorted by dataset index.

Plain functions over tensors and a gather callable (the LightningModule's ``all_gather``), so the
de-duplication is testable without processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

__all__ = ["batch_length", "first_occurrences", "plan_batches", "select_samples"]


def first_occurrences(table: Tensor) -> Tensor:
    """Which entries of ``table [W, P]`` (dataset indices of rank ``w`` at position ``p``, ``-1`` for no
    sample) are a sample's first place in the padded order ``p * W + w``: ``[W, P]`` bool."""
    world = table.shape[0]
    flat = table.t().reshape(-1)  # [P * W], the padded order: position * world_size + rank
    order = torch.arange(flat.numel())
    unique, inverse = torch.unique(flat, return_inverse=True)
    first = torch.full((unique.numel(),), flat.numel(), dtype=torch.long).scatter_reduce_(
        0, inverse, order, reduce="amin"
    )  # [U] the first place of each index
    return ((first[inverse] == order) & (flat >= 0)).reshape(-1, world).t()  # [P * W] -> [W, P]


def plan_batches(
    loader: DataLoader,
    world_size: int,
    rank: int,
    all_gather: Callable[[Tensor], Tensor],
    device: torch.device,
) -> tuple[list[Tensor], list[Tensor] | None]:
    """The dataset indices of each batch ``loader`` gives this process and, under DDP, the mask of the
    samples this process evaluates in each batch (their first occurrences over all processes).

    ``all_gather`` stacks a tensor of every process (``[W, ...]``); every process must call this. A
    streamed dataset (no batch sampler) shards itself without padding: no indices, no masks.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is None:
        return [], None
    batches = [torch.as_tensor(list(b), dtype=torch.long) for b in batch_sampler]
    if world_size == 1:
        return batches, None
    local = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.long)
    sizes = all_gather(torch.tensor([local.numel()], device=device)).reshape(-1).tolist()
    padded = torch.full((max(sizes),), -1, dtype=torch.long, device=device)
    padded[: local.numel()] = local.to(device)
    table = all_gather(padded).reshape(world_size, -1).cpu()  # [W, P]
    keep = first_occurrences(table)[rank]  # [P]
    return batches, list(keep[: local.numel()].split([b.numel() for b in batches]))


def select_samples(value: Any, mask: Tensor) -> Any:
    """The samples of a batch entry that ``mask [B]`` keeps: tensors by their first dim, per-sample lists
    by position; anything else (not per sample) unchanged."""
    if isinstance(value, Tensor):
        return value[mask.to(value.device)]
    if isinstance(value, list) and len(value) == mask.numel():
        return [item for item, keep in zip(value, mask.tolist()) if keep]
    return value


def batch_length(batch: Mapping[str, Any]) -> int:
    """Samples in a batch: the first dim of its first tensor, else the length of its first list."""
    for value in batch.values():
        if isinstance(value, Tensor):
            return int(value.shape[0])
    return next(len(v) for v in batch.values() if isinstance(v, list))
