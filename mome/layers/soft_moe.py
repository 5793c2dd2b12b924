"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts", arXiv:2308.00951).

Each of the ``E * P`` slots takes a convex combination of all tokens of a sequence, the experts
process the slots, and each token takes a convex combination of all slot outputs:

    logits[b, m, s] = scale * <x_hat[b, m], mu_hat[:, s]>      (x_hat, mu_hat: unit L2 norm)
    D = softmax_m(logits)   (dispatch, over tokens)      C = softmax_s(logits)   (combine, over slots)
    slots[b, s] = sum_m D[b, m, s] x[b, m]                      (the *un-normalised* tokens)
    y[b, m] = sum_s C[b, m, s] FFN_{expert(s)}(slots[b, s])

This follows the official ``vmoe/projects/soft_moe/router.py``: the L2 normalisation (eps 1e-6) and
the learned scalar ``scale`` only enter the logits; ``mu`` is ``[D, E*P]`` (lecun-normal init).
With ``dispatch_dtype`` (e.g. bfloat16) the tokens entering the dispatch and the slot outputs entering
the combine are rounded to that dtype, as the official router's ``Bfloat16Dispatcher`` does; the weights
and both weighted sums stay in the compute dtype. No auxiliary loss. Shapes: ``B`` sequences, ``M``
tokens, ``D`` width, ``E`` experts, ``P`` slots per expert, ``S = E*P``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import check_int, check_token_batch
from .experts import Experts, given_or_new_experts, resolve_dispatch_dtype, round_through
from .moe import RoutedLayer, layer_dtype, recomputing

__all__ = ["SoftMoE"]


def _l2_normalize(x: Tensor, dim: int, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(sum x^2 + eps)`` (the official normalisation, eps inside the root)."""
    return x * torch.rsqrt(x.square().sum(dim=dim, keepdim=True) + eps)


def soft_routing_weights(tokens: Tensor, mu: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Soft MoE's ``(dispatch, combine)``, each ``[B, M, S]``, for tokens ``[B, M, D]`` and slot keys ``mu [D, S]``:
    ``logits = scale * <x_hat, mu_hat>`` (fp32), dispatch = softmax over the tokens, combine = over the slots.

    The token's norm is divided out of the ``[B, M, S]`` products, ``<x, scale mu_hat> / sqrt(|x|^2 + eps)``, rather
    than out of the ``[B, M, D]`` tokens before them: the same logits with ``S < D`` multiplications per token."""
    inverse_norm = torch.rsqrt(tokens.square().sum(dim=-1, keepdim=True) + 1e-6)  # [B, M, 1]
    logits = (torch.einsum("bmd,ds->bms", tokens, _l2_normalize(mu, 0) * scale) * inverse_norm).float()  # [B, M, S]
    return logits.softmax(dim=1).to(tokens.dtype), logits.softmax(dim=2).to(tokens.dtype)


def soft_routing_statistics(dispatch: Tensor, combine: Tensor, num_experts: int) -> dict[str, Tensor]:
    """Statistics of one Soft MoE forward from its ``dispatch`` and ``combine`` weights ``[B, M, E*P]``: the mean
    largest combine and dispatch weight, and ``expert_load [E]``, the share of each token's output that comes from
    each expert, averaged over tokens (0 where there are no tokens, not NaN)."""
    if combine.numel() == 0:
        zero = combine.new_zeros((), dtype=torch.float32)
        return {
            "combine_weights_max_mean": zero,
            "dispatch_weights_max_mean": zero,
            "expert_load": combine.new_zeros(num_experts, dtype=torch.float32),
        }
    batch, tokens, num_slots = combine.shape
    per_expert = combine.float().view(batch, tokens, num_experts, num_slots // num_experts).sum(dim=-1)  # [B, M, E]
    return {
        "combine_weights_max_mean": combine.amax(dim=2).mean().float(),
        "dispatch_weights_max_mean": dispatch.amax(dim=1).mean().float(),
        "expert_load": per_expert.mean(dim=(0, 1)),
    }


class SoftMoE(RoutedLayer):
    """Soft MoE FFN, a drop-in for a timm ``Mlp`` on ``[B, M, D]`` sequences.

    Args:
        dim: token width ``D``.
        hidden_dim: hidden width of each expert.
        num_experts: ``E``.
        slots_per_expert: ``P``.
        gated, act_layer, bias: expert options (see :class:`~mome.layers.experts.Experts`).
        experts: pre-built :class:`Experts` (e.g. upcycled), instead of the options above.
        dispatch_dtype: round the tokens before the dispatch and the slot outputs before the combine
            to this dtype (``"bfloat16"``: the official Soft MoE's hard-coded ``Bfloat16Dispatcher``);
            None (default): no rounding.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        slots_per_expert: int = 1,
        *,
        gated: bool = False,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        experts: Experts | None = None,
        dispatch_dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            check_int(name, value, owner=owner)
        check_int("slots_per_expert", slots_per_expert, owner=owner)
        self.experts = given_or_new_experts(experts, num_experts, dim, hidden_dim, owner, gated, act_layer, bias)
        self.num_experts = num_experts
        self.slots_per_expert = slots_per_expert
        self.dispatch_dtype = resolve_dispatch_dtype(dispatch_dtype)
        self.mu = nn.Parameter(torch.randn(dim, num_experts * slots_per_expert) / math.sqrt(dim))  # lecun normal
        self.scale = nn.Parameter(torch.ones(()))

    def extra_repr(self) -> str:
        extra = f", dispatch_dtype={self.dispatch_dtype}" if self.dispatch_dtype is not None else ""
        return f"num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}{extra}"

    def routing_weights(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(dispatch, combine)``, each ``[B, M, E*P]`` (slot ``e*P + p``), for tokens ``[B, M, D]``."""
        return soft_routing_weights(tokens, self.mu, self.scale)

    def forward(self, x: Tensor, modality_ids: Tensor | None = None, token_ids: Tensor | None = None) -> Tensor:
        """``x [B, M, D]`` (or ``[M, D]``, one sequence) -> same shape; ``B`` and ``M`` may be 0 (an empty output).

        Checks ``x``: floating, rank 2 or 3, last dim ``D``, the layer's dtype outside autocast.
        """
        dtype = layer_dtype(x, self.mu) if isinstance(x, Tensor) else None
        check_token_batch("x", x, self.mu.shape[0], min_rank=2, max_rank=3, dtype=dtype, owner=type(self).__name__)
        squeeze = x.dim() == 2
        tokens = x.unsqueeze(0) if squeeze else x  # [B, M, D]
        batch, _, dim = tokens.shape
        num_experts, slots = self.num_experts, self.slots_per_expert
        dispatch, combine = self.routing_weights(tokens)  # [B, M, S] each
        slot_inputs = torch.einsum("bms,bmd->bsd", dispatch, round_through(tokens, self.dispatch_dtype))  # [B, S, D]
        # [B, E*P, D] -> [E, B*P, D]: each expert's slots of all sequences in one buffer.
        buffers = (
            slot_inputs.view(batch, num_experts, slots, dim).transpose(0, 1).reshape(num_experts, batch * slots, dim)
        )
        slot_outputs = self.experts.forward_slots(buffers)  # [E, B*P, D] (exchanged under expert parallelism)
        slot_outputs = (
            slot_outputs.view(num_experts, batch, slots, dim).transpose(0, 1).reshape(batch, num_experts * slots, dim)
        )
        slot_outputs = round_through(slot_outputs, self.dispatch_dtype)
        out = torch.einsum("bms,bsd->bmd", combine, slot_outputs)  # [B, M, D]
        if not recomputing():  # a gradient checkpoint's re-run in backward: the forward pass recorded these
            self.defer_routing_stats(lambda: soft_routing_statistics(dispatch.detach(), combine.detach(), num_experts))
        return out.squeeze(0) if squeeze else out
