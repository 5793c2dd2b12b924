"""A strict key map from an upstream state dict onto a model's state dict.

Every converter in :mod:`mome.convert` is written against :class:`KeyMap`: it *takes* upstream
tensors by name (marking them used), *puts* target tensors by name, and at the end
:meth:`KeyMap.finish` checks, in one readable report, that

- every upstream key was used (or matches one of the caller's ``ignore_prefixes``),
- every upstream key the map asked for exists,
- every key of the target model was produced, with the target's shape.

Anything else raises :class:`~mome.CheckpointMismatchError` (a ``ValueError``) listing the keys,
capped per list, with counts. Nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .._errors import CheckpointMismatchError

__all__ = ["KeyMap", "mismatch_report", "replicate", "resample_pos_embed"]

#: Keys shown per list in a mismatch report.
MAX_LISTED = 20


def _listing(label: str, keys: Sequence[str]) -> str:
    more = f" (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return f"  {len(keys)} {label}: {', '.join(keys[:MAX_LISTED])}{more}"


def mismatch_report(header: str, sections: Iterable[tuple[str, Sequence[str]]]) -> str | None:
    """``header`` plus one capped line per non-empty ``(label, keys)`` section, or None if all are empty."""
    lines = [_listing(label, list(keys)) for label, keys in sections if keys]
    return "\n".join([header, *lines]) if lines else None


def replicate(value: Tensor, num_experts: int) -> Tensor:
    """One dense tensor copied into every expert (sparse upcycling): ``[...] -> [E, ...]``."""
    return value.unsqueeze(0).expand(num_experts, *value.shape).clone()


def resample_pos_embed(
    posemb: Tensor,
    target_shape: Sequence[int],
    grid_size: Sequence[int],
    num_prefix_tokens: int,
    *,
    interpolation: str = "bicubic",
    antialias: bool = False,
) -> Tensor:
    """A learned absolute position table ``[1, prefix + h*w, D]`` resized to the model's patch grid.

    Unchanged when the shapes already agree; otherwise the patch rows are resampled on a square
    source grid with :func:`timm.layers.resample_abs_pos_embed` (bicubic, no antialias: the
    ``F.interpolate`` call of BEiT/VLMo's ``interpolate_pos_embed``) and the prefix rows kept.
    A table whose width differs is returned as is (the strict check then reports it).
    """
    if tuple(posemb.shape) == tuple(target_shape) or posemb.shape[-1] != target_shape[-1]:
        return posemb
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(
        posemb.float(),
        new_size=list(grid_size),
        num_prefix_tokens=num_prefix_tokens,
        interpolation=interpolation,
        antialias=antialias,
        verbose=False,
    ).to(posemb.dtype)


class KeyMap:
    """Bookkeeping for one conversion: upstream ``source`` -> ``target`` (the model's state dict).

    Args:
        source: upstream tensors by upstream name.
        target: the model's ``state_dict()`` (only names and shapes are read).
        what: how reports name the source (e.g. ``"unilm_vlmo checkpoint"``).
        ignore_prefixes: upstream key prefixes the caller chose to leave out (e.g. a VQA head);
            they are neither reported nor converted.
    """

    def __init__(
        self,
        source: Mapping[str, Tensor],
        target: Mapping[str, Tensor],
        what: str,
        ignore_prefixes: Iterable[str] = (),
    ) -> None:
        self.source = source
        self.target = target
        self.what = what
        self.ignore_prefixes = tuple(ignore_prefixes)
        self.out: dict[str, Tensor] = {}
        self.origin: dict[str, str] = {}  # target key -> upstream key(s) it came from
        self.used: set[str] = set()
        self.absent: list[str] = []  # upstream keys the map asked for that the source lacks
        self.errors: list[str] = []  # value checks that failed (e.g. a stored index buffer)
        self.attempted: set[str] = set()  # target keys a rule was written for (produced or not)

    # ----------------------------------------------------------------- reading
    def keys(self, prefix: str = "") -> list[str]:
        """Upstream keys starting with ``prefix`` (in source order)."""
        return [k for k in self.source if k.startswith(prefix)]

    def take(self, key: str) -> Tensor | None:
        """The upstream tensor ``key`` (marked used), or None after recording it as absent."""
        if key not in self.source:
            self.absent.append(key)
            return None
        self.used.add(key)
        return self.source[key]

    def consume(self, key: str) -> Tensor | None:
        """Mark an upstream key used without an absent record if it is missing (derived buffers)."""
        if key in self.source:
            self.used.add(key)
            return self.source[key]
        return None

    def error(self, message: str) -> None:
        self.errors.append(message)

    # ----------------------------------------------------------------- writing
    def put(self, key: str, value: Tensor, origin: str = "(derived)") -> None:
        self.attempted.add(key)
        self.out[key] = value
        self.origin[key] = origin

    def copy(self, dst: str, src: str, fn: Callable[[Tensor], Tensor] | None = None) -> None:
        """``target[dst] = fn(source[src])`` if ``src`` exists (else it is recorded as absent)."""
        self.attempted.add(dst)
        value = self.take(src)
        if value is not None:
            self.put(dst, fn(value) if fn is not None else value, src)

    def merge(self, dst: str, srcs: Sequence[str], fn: Callable[[list[Tensor]], Tensor] = torch.stack) -> None:
        """``target[dst] = fn([source[s] for s in srcs])`` if all exist; by default stacked on a new
        leading axis (e.g. per-modality FFNs into ``[E, ...]``)."""
        self.attempted.add(dst)
        values = [self.take(src) for src in srcs]
        if all(v is not None for v in values):
            self.put(dst, fn(values), " + ".join(srcs))

    def keep_target(self, key: str) -> None:
        """Use the model's own current value for ``key`` (e.g. a freshly initialised router)."""
        self.put(key, self.target[key], "(model init)")

    def copy_same_names(self) -> None:
        """Every target key no rule was written for comes from the upstream key of the same name."""
        for key in self.target:
            if key not in self.attempted:
                self.copy(key, key)

    # ----------------------------------------------------------------- result
    def finish(self) -> dict[str, Tensor]:
        """The converted state dict, or :class:`~mome.CheckpointMismatchError` naming every problem."""
        unused = [k for k in self.source if k not in self.used and not k.startswith(self.ignore_prefixes)]
        missing = [k for k in self.target if k not in self.out]
        extra = [k for k in self.out if k not in self.target]
        shapes = [
            f"{k} <- {self.origin[k]}: {tuple(v.shape)} vs model {tuple(self.target[k].shape)}"
            for k, v in self.out.items()
            if k in self.target and tuple(v.shape) != tuple(self.target[k].shape)
        ]
        hint = " (pass ignore_prefixes=... to leave upstream parts out on purpose)" if unused else ""
        report = mismatch_report(
            f"{self.what} does not convert exactly onto the model{hint}:",
            [
                ("upstream key(s) with no counterpart in the model", unused),
                ("upstream key(s) the conversion needs but the checkpoint lacks", self.absent),
                ("model key(s) left without a value", missing),
                ("converted key(s) the model does not have", extra),
                ("mis-shaped key(s)", shapes),
                ("value check(s) failed", self.errors),
            ],
        )
        if report:
            raise CheckpointMismatchError(report)
        return self.out
