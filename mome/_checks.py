"""Argument and input checks shared by every family and layer; each raises a typed :mod:`mome._errors` error
that names the argument, what was expected and what came.

The forward-boundary checks read only shapes, dtypes and (for ids) one ``min``/``max`` reduction, so their cost
is a few microseconds per call (measured by ``tools/bench_checks.py``).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch import Tensor

from ._errors import InvalidArgumentError, InvalidInputError

__all__ = [
    "check_choice",
    "check_divisible",
    "check_finite",
    "check_finite_positive",
    "check_ids_in_range",
    "check_top_k",
    "check_image_batch",
    "check_int",
    "check_probability",
    "check_token_batch",
]


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_int(name: str, value: object, *, minimum: int = 1, owner: str | None = None, optional: bool = False) -> None:
    """``value`` is a whole number ``>= minimum`` (``None`` too when ``optional``)."""
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        none = " (or None)" if optional else ""
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InvalidArgumentError(name, expected + none, value, owner)


def check_top_k(top_k: object, num_experts: int, *, owner: str | None = None) -> None:
    """``top_k`` is a whole number in ``[1, num_experts]`` (experts chosen per token)."""
    if not _is_int(top_k) or not 1 <= top_k <= num_experts:
        raise InvalidArgumentError("top_k", f"an integer in [1, num_experts={num_experts}]", top_k, owner)


def check_finite_positive(name: str, value: object, *, owner: str | None = None, optional: bool = False) -> None:
    """``value`` is a finite real number ``> 0`` (``None`` too when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(name, "a finite number > 0" + (" (or None)" if optional else ""), value, owner)


def check_finite(
    name: str, value: object, *, minimum: float | None = None, owner: str | None = None, optional: bool = False
) -> None:
    """``value`` is a finite real number, ``>= minimum`` when given (``None`` too when ``optional``)."""
    if optional and value is None:
        return
    bad = isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value)
    if bad or (minimum is not None and value < minimum):
        expected = (
            "a finite number" + (f" >= {minimum}" if minimum is not None else "") + (" (or None)" if optional else "")
        )
        raise InvalidArgumentError(name, expected, value, owner)


def check_probability(name: str, value: object, *, owner: str | None = None) -> None:
    """``value`` is a real number in ``[0, 1)`` (a dropout rate)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < 1:
        raise InvalidArgumentError(name, "a number in [0, 1)", value, owner)


def check_choice(name: str, value: object, choices: tuple, *, owner: str | None = None) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise InvalidArgumentError(name, "one of " + ", ".join(repr(c) for c in choices), value, owner)


def check_divisible(name: str, value: object, divisor: int, divisor_name: str, *, owner: str | None = None) -> None:
    """``value`` (an int or a pair of ints) is positive and divisible by ``divisor``."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not values or not all(_is_int(v) and v > 0 and v % divisor == 0 for v in values):
        raise InvalidArgumentError(name, f"a positive multiple of {divisor_name}={divisor}", value, owner)


def check_image_batch(
    name: str, images: object, channels: int, size: tuple[int, int] | None, *, owner: str | None = None
) -> None:
    """``images`` is a floating ``[B, channels, H, W]`` tensor, of ``size=(H, W)`` when given."""
    if not isinstance(images, Tensor):
        raise InvalidInputError(name, f"a [B, {channels}, H, W] tensor", type(images).__name__, owner)
    expected = f"a [B, {channels}, {size[0]}, {size[1]}] float tensor" if size else f"a [B, {channels}, H, W] tensor"
    if images.dim() != 4:
        raise InvalidInputError(name, expected, f"shape {tuple(images.shape)}", owner)
    if images.shape[1] != channels or (size is not None and tuple(images.shape[-2:]) != tuple(size)):
        raise InvalidInputError(name, expected, f"shape {tuple(images.shape)}", owner)
    if not torch.is_floating_point(images):
        raise InvalidInputError(name, "a floating-point tensor", images.dtype, owner)


def check_token_batch(
    name: str,
    tokens: object,
    dim: int,
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
    dtype: torch.dtype | None = None,
    owner: str | None = None,
) -> None:
    """``tokens`` is a floating ``[..., dim]`` tensor of rank ``min_rank`` to ``max_rank`` (no upper bound when None),
    of ``dtype`` when given (a layer's parameter dtype: inputs of another dtype fail inside its matmuls)."""
    if max_rank == min_rank:
        ranks = f"rank {min_rank}"
    else:
        ranks = f"rank {min_rank} to {max_rank}" if max_rank is not None else f"rank >= {min_rank}"
    expected = f"a floating [..., {dim}] tensor of {ranks}"
    if not isinstance(tokens, Tensor):
        raise InvalidInputError(name, expected, type(tokens).__name__, owner)
    rank = tokens.dim()
    if rank < min_rank or (max_rank is not None and rank > max_rank) or rank == 0 or tokens.shape[-1] != dim:
        raise InvalidInputError(name, expected, f"shape {tuple(tokens.shape)}", owner)
    if not torch.is_floating_point(tokens):
        raise InvalidInputError(name, "a floating-point tensor", tokens.dtype, owner)
    if dtype is not None and tokens.dtype != dtype:
        raise InvalidInputError(
            name, f"a {dtype} tensor (the layer's dtype; or run under torch.autocast)", tokens.dtype, owner
        )


def check_ids_in_range(name: str, ids: object, limit: int, *, owner: str | None = None, what: str = "ids") -> None:
    """``ids`` is an integer tensor whose values lie in ``[0, limit)`` (e.g. token ids within the vocabulary).

    The range is read on CPU tensors only, outside ``torch.compile``: on an accelerator its ``min``/``max`` would
    synchronise the host with the device on every forward (there, an id outside the table is the device's error)."""
    if not isinstance(ids, Tensor):
        raise InvalidInputError(name, "an integer tensor", type(ids).__name__, owner)
    if torch.is_floating_point(ids) or ids.dtype == torch.bool or torch.is_complex(ids):
        raise InvalidInputError(name, "an integer tensor", ids.dtype, owner)
    if ids.numel() and ids.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= limit:
            raise InvalidInputError(name, f"{what} in [0, {limit})", f"values in [{low}, {high}]", owner)
