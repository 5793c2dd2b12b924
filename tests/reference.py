"""Naive per-token references the fast paths are checked against."""

import torch
from torch import Tensor

from mome.layers import Experts


def expert_ffn(experts: Experts, e: int, x: Tensor) -> Tensor:
    """One expert on one token, written out with plain matmuls."""
    hidden = x @ experts.w_in[e].T
    if experts.b_in is not None:
        hidden = hidden + experts.b_in[e]
    if experts.gated:
        gate, up = hidden.chunk(2, dim=-1)
        hidden = experts.act(gate) * up
    else:
        hidden = experts.act(hidden)
    out = hidden @ experts.w_out[e].T
    if experts.b_out is not None:
        out = out + experts.b_out[e]
    return out


def naive_moe(experts: Experts, tokens: Tensor, expert_index: Tensor, weights: Tensor, dropped: Tensor) -> Tensor:
    """``out[t] = sum_j w[t, j] * FFN_{e[t, j]}(x[t])`` over the kept assignments, one token at a time."""
    rows = []
    for t in range(tokens.shape[0]):
        acc = torch.zeros_like(tokens[t])
        for j in range(expert_index.shape[1]):
            if not dropped[t, j]:
                acc = acc + weights[t, j] * expert_ffn(experts, int(expert_index[t, j]), tokens[t])
        rows.append(acc)
    return torch.stack(rows)
