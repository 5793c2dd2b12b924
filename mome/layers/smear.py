"""SMEAR (Muqeeth et al. 2023, "Soft Merging of Experts with Adaptive Routing", arXiv:2306.03745).

Instead of sending each input to a few experts, SMEAR merges the parameters of all experts into one FFN per
example, weighted by the router's probabilities, and runs that FFN on every token of the example:

    v[b] = mean_m x[b, m]                                  (the example's pooled tokens: routing per example)
    p[b] = softmax(W v[b])                                 ([E] router probabilities)
    theta_bar[b] = sum_e p[b, e] theta_e                   (every expert parameter: W_in, b_in, W_out, b_out)
    y[b, m] = FFN(x[b, m]; theta_bar[b])

Every step is differentiable, so the router trains by backpropagation alone: no discrete choice, no capacity,
no dropped token and no auxiliary loss (the paper trains SMEAR with the task loss only). The experts are a
:class:`~mome.layers.Experts` (stacked ``w_in [E, H', D]``, ``w_out [E, D, H]``); the merge is one matmul per
parameter and the merged FFNs run batched (``bmm`` over examples). Shapes: ``B`` examples, ``M`` tokens,
``D`` width, ``H`` hidden width (``H' = 2H`` for gated experts), ``E`` experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int, check_token_batch
from .._errors import UnsupportedOptionError
from .experts import Experts, batched_linear, given_or_new_experts
from .moe import RoutedLayer, layer_dtype, recomputing

__all__ = ["SMEAR"]


class SMEAR(RoutedLayer):
    """SMEAR FFN, a drop-in for a timm ``Mlp`` on ``[B, M, D]`` sequences (``[M, D]``: one example).

    Records as routing statistics (:func:`mome.routing_stats`) ``expert_load [E]``, the mean over examples of
    ``p[b]`` (each expert's share of the merged parameters; sums to 1), and ``router_entropy``, the mean entropy of
    ``p[b]`` (nats). No auxiliary loss.

    Args:
        dim: token width ``D``.
        hidden_dim: hidden width of each expert.
        num_experts: ``E`` (at least 1).
        gated, act_layer, bias: expert options (see :class:`~mome.layers.Experts`).
        experts: pre-built :class:`Experts` (e.g. upcycled), instead of the options above.
        router_bias: add a bias to the router projection ``W``.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        *,
        gated: bool = False,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        experts: Experts | None = None,
        router_bias: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            check_int(name, value, owner=owner)
        self.experts = given_or_new_experts(experts, num_experts, dim, hidden_dim, owner, gated, act_layer, bias)
        if self.experts.dispatch_dtype is not None:
            reason = "SMEAR dispatches no tokens (every token runs its example's merged FFN)"
            raise UnsupportedOptionError("experts.dispatch_dtype", owner, reason, self.experts.dispatch_dtype)
        self.num_experts = num_experts
        self.router = nn.Linear(dim, num_experts, bias=router_bias)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"

    def router_probs(self, tokens: Tensor) -> Tensor:
        """``p [B, E]`` of ``tokens [B, M, D]``: softmax of the router on each example's mean token (an example
        without tokens pools to 0), in fp32 at least (float64 for a float64 layer)."""
        dtype = torch.promote_types(self.router.weight.dtype, torch.float32)
        pooled = tokens.sum(dim=1) / max(tokens.shape[1], 1)  # [B, D]
        bias = None if self.router.bias is None else self.router.bias.to(dtype)
        return F.linear(pooled.to(dtype), self.router.weight.to(dtype), bias).softmax(dim=-1)

    def merged_parameters(self, probs: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """``(w_in [B, H', D], b_in [B, H'] | None, w_out [B, D, H], b_out [B, D] | None)``: each expert parameter
        averaged with the weights ``probs [B, E]``."""
        experts = self.experts

        def merge(parameter: Tensor | None) -> Tensor | None:
            if parameter is None:
                return None
            flat = probs.to(parameter.dtype) @ parameter.reshape(parameter.shape[0], -1)  # [B, numel / E]
            return flat.view(probs.shape[0], *parameter.shape[1:])

        w_in, w_out = experts.dense_weights()  # dequantized when mome.quantize has quantized them
        return merge(w_in), merge(experts.b_in), merge(w_out), merge(experts.b_out)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, M, D]`` (or ``[M, D]``, one example) -> same shape; ``B`` and ``M`` may be 0 (an empty output).

        Checks ``x``: floating, rank 2 or 3, last dim ``D``, the layer's dtype outside autocast.
        """
        dtype = layer_dtype(x, self.experts.w_in) if isinstance(x, Tensor) else None
        check_token_batch("x", x, self.experts.dim, min_rank=2, max_rank=3, dtype=dtype, owner=type(self).__name__)
        squeeze = x.dim() == 2
        tokens = x.unsqueeze(0) if squeeze else x  # [B, M, D]
        probs = self.router_probs(tokens)  # [B, E]
        w_in, b_in, w_out, b_out = self.merged_parameters(probs)
        hidden = self.experts.activate(batched_linear(tokens, w_in, b_in))  # [B, M, H']
        out = batched_linear(hidden, w_out, b_out)  # [B, M, D]
        if not recomputing():  # a gradient checkpoint's re-run in backward: the forward pass recorded these
            with torch.no_grad():
                entropy = -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1)  # [B]
                empty = probs.shape[0] == 0  # no examples: the statistics are 0, not NaN
                self.last_routing_stats = {
                    "expert_load": probs.new_zeros(self.num_experts) if empty else probs.mean(dim=0),
                    "router_entropy": entropy.new_zeros(()) if empty else entropy.mean(),
                }
        return out.squeeze(0) if squeeze else out
