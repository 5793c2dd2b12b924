"""Auxiliary losses of mixture-of-experts routers, as pure functions of router outputs.

Every function takes plain tensors (router probabilities ``[T, E]``, logits, expert indices) so it
can be checked by hand and reused outside :class:`mome.layers.MoE`. Shapes: ``T`` tokens, ``E``
experts, ``k`` experts per token, ``M`` modalities.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_finite

__all__ = [
    "coefficient_of_variation_squared",
    "global_entropy_loss",
    "importance_loss",
    "load_balance_loss",
    "load_loss",
    "local_entropy_loss",
    "noisy_top_k_selection_probs",
    "router_z_loss",
    "sequence_balance_loss",
    "soft_minimum_threshold",
]


def coefficient_of_variation_squared(values: Tensor) -> Tensor:
    """``(std(v) / mean(v))**2`` over the last axis, with the population std (as ``jnp.std``)."""
    return values.var(dim=-1, unbiased=False) / values.mean(dim=-1).square()


def load_balance_loss(router_probs: Tensor, top1_index: Tensor) -> Tensor:
    """Switch Transformer / GShard load-balancing loss.

    ``L = E * sum_e f_e * P_e`` with ``f_e`` the fraction of tokens whose first choice is expert
    ``e`` and ``P_e`` the mean router probability of ``e`` (Fedus et al. 2021, eq. 4; Lepikhin et al.
    2020, Algorithm 1; DeepSpeed's ``l_aux``, used by MoE-LLaVA with weight 0.01). Equals 1 for a
    perfectly uniform router; only ``P_e`` carries a gradient.

    Args:
        router_probs: ``[..., T, E]`` softmax probabilities; leading axes are routing groups, each
            with its own loss, and the mean over groups is returned.
        top1_index: ``[..., T]`` index of each token's first-choice expert.
    """
    num_experts = router_probs.shape[-1]
    experts = torch.arange(num_experts, device=top1_index.device)
    # One-hot by comparison: F.one_hot reads the index range on the host (a sync on an accelerator).
    fraction_dispatched = (top1_index.unsqueeze(-1) == experts).to(router_probs.dtype).mean(dim=-2)  # [..., E]
    mean_prob = router_probs.mean(dim=-2)  # [..., E]
    return num_experts * (fraction_dispatched * mean_prob).sum(dim=-1).mean()


def sequence_balance_loss(router_probs: Tensor, expert_index: Tensor) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report",
    eq. 17-20), without its weight ``alpha`` (given in ``aux_loss_weights``).

    Per sequence of ``T`` tokens: ``f_i = E / (K T) * sum_t 1[i in TopK(t)]``, ``s'_{i,t} = s_{i,t} / sum_j s_{j,t}``,
    ``P_i = (1/T) sum_t s'_{i,t}``, ``L = sum_i f_i P_i``; the mean over sequences is returned. Equals 1 for a
    uniform router; only ``P_i`` carries a gradient.

    Args:
        router_probs: ``[B, T, E]`` affinities ``s`` of each sequence's tokens.
        expert_index: ``[B, T, K]`` the experts selected for each token.
    """
    num_experts, top_k, length = router_probs.shape[-1], expert_index.shape[-1], router_probs.shape[-2]
    selected = expert_index.reshape(expert_index.shape[0], -1)  # [B, T*K]
    counts = router_probs.new_zeros(selected.shape[0], num_experts)
    counts.scatter_add_(1, selected, torch.ones_like(selected, dtype=router_probs.dtype))  # [B, E]
    fraction = counts * (num_experts / (top_k * length))  # f [B, E]
    mean_affinity = (router_probs / router_probs.sum(dim=-1, keepdim=True)).mean(dim=-2)  # P [B, E]
    return (fraction * mean_affinity).sum(dim=-1).mean()


def importance_loss(router_probs: Tensor) -> Tensor:
    """V-MoE importance loss (Riquelme et al. 2021, appendix A.2; Shazeer et al. 2017).

    ``Imp_e = sum_x p_e(x)`` over the clean (noise-free) softmax, ``L_imp = CV(Imp)^2``. Leading
    axes of ``router_probs [..., T, E]`` are routing groups: the loss is averaged over them, as V-MoE.
    """
    return coefficient_of_variation_squared(router_probs.sum(dim=-2)).mean()


def noisy_top_k_selection_probs(logits: Tensor, noisy_logits: Tensor, noise_std: float, k: int) -> Tensor:
    """Probability that each expert would be among the top-k if the noise were re-sampled.

    ``P(x, e) = 1 - Phi((eta_k(x) - (xW)_e) / sigma)`` where ``eta_k(x)`` is the k-th largest noisy
    logit of token ``x`` and ``Phi`` the standard normal CDF (V-MoE, appendix A.2). Returns ``[T, E]``.
    """
    threshold = noisy_logits.topk(k, dim=-1).values[..., -1:]  # [T, 1]
    noise_required_to_win = (threshold - logits) / noise_std  # [T, E]
    return 1.0 - torch.special.ndtr(noise_required_to_win)


def load_loss(selection_probs: Tensor) -> Tensor:
    """V-MoE load loss: ``load_e = mean_x P(x, e)``, ``L_load = CV(load)^2`` (averaged over groups).

    ``selection_probs [..., T, E]`` comes from :func:`noisy_top_k_selection_probs`; it only exists
    when the router adds noise (training), so V-MoE drops this term at evaluation.
    """
    return coefficient_of_variation_squared(selection_probs.mean(dim=-2)).mean()


def router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): ``mean_x (logsumexp_e logits_e(x))**2``.

    Its gradient shrinks the logits towards zero, which keeps the router numerically stable.
    """
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()


def _entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last axis, with ``0 log 0 = 0``."""
    return -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1)


def _per_modality_mean(values: Tensor, modality_ids: Tensor | None, num_modalities: int) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` (``[T, ...]``) over the tokens of each modality: ``[M, ...]`` and counts ``[M]``."""
    if modality_ids is None:
        modality_ids = torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
    flat = values.reshape(values.shape[0], math.prod(values.shape[1:]))  # [T, F]; explicit F so T = 0 works
    sums = flat.new_zeros(num_modalities, flat.shape[1]).index_add_(0, modality_ids, flat)
    counts = flat.new_zeros(num_modalities).index_add_(0, modality_ids, flat.new_ones(flat.shape[0]))
    means = sums / counts.clamp_min(1).unsqueeze(-1)
    return means.reshape(num_modalities, *values.shape[1:]), counts


def local_entropy_loss(router_probs: Tensor, modality_ids: Tensor | None = None, num_modalities: int = 1) -> Tensor:
    """LIMoE local entropy, per modality (Mustafa et al. 2022, eq. 2).

    ``Omega_local(m) = (1/n_m) sum_{x in m} H(p(.|x))``. Minimising it makes each token's routing
    confident. Returns ``[M]``; a modality without tokens contributes 0.
    """
    means, _ = _per_modality_mean(_entropy(router_probs), modality_ids, num_modalities)
    return means


def global_entropy_loss(
    router_probs: Tensor,
    modality_ids: Tensor | None = None,
    num_modalities: int = 1,
    threshold: float | None = None,
) -> Tensor:
    """LIMoE global entropy, per modality (Mustafa et al. 2022, eq. 3), optionally thresholded.

    ``Omega_global(m) = -H((1/n_m) sum_{x in m} p(.|x))``: minimising it spreads each modality's
    tokens over many experts. With ``threshold = tau`` (LIMoE uses ``tau = log S`` for a soft minimum
    of ``S`` experts per modality) the loss is ``max(0, tau + Omega_global(m))``: it stops pushing
    once the marginal entropy exceeds ``tau``. Returns ``[M]``; a modality without tokens gives 0.
    """
    marginal, counts = _per_modality_mean(router_probs, modality_ids, num_modalities)  # [M, E]
    loss = -_entropy(marginal)
    if threshold is not None:
        loss = (loss + threshold).clamp_min(0.0)
    return torch.where(counts > 0, loss, torch.zeros_like(loss))


def soft_minimum_threshold(num_experts: float) -> float:
    """LIMoE's global-entropy threshold for a soft minimum of ``num_experts`` experts: ``log(S)`` (``S >= 1``)."""
    check_finite("num_experts", num_experts, minimum=1, owner="soft_minimum_threshold")
    return math.log(num_experts)
