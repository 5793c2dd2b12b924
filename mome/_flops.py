"""What one sample costs an MoE model: total and active parameters, and active FLOPs measured on an example.

**Parameters.** ``total`` counts every parameter. ``active`` counts the parameters one token's forward uses:

    active = total - sum_l P_l + sum_l (k_l / E_l) * P_l

where ``P_l`` are the routed expert parameters of MoE layer ``l`` (its stacked ``experts``; shared experts,
routers and everything outside the MoE layers count in full) and ``k_l / E_l`` the share of them a token uses:
top-k routing (``TopKRouter``, noisy, BPR, GShard top-2, hash) ``k / E``; expert choice ``c / E`` (``c`` the
router's capacity factor, the mean number of experts per token); modality routing (VLMo's multiway FFN) ``1 /
M``; a Soft MoE layer ``1`` (every slot mixes every token, so each token's output draws on every expert). It is
a count from the configuration, not from one batch's routing (capacity drops are not subtracted).

**FLOPs.** ``flops`` are measured with ``torch.utils.flop_counter.FlopCounterMode`` on one example of batch size 1
in eval mode with dropless routing (:func:`mome.layers.eval_capacity`): what the model computes for that sample,
so only the experts each token is routed to count. ``FlopCounterMode`` counts matrix products and convolutions
(``2 * m * n * k`` for an ``[m, k] x [k, n]`` product; ``mome.layers.experts`` adds the formula of
``aten._grouped_mm``, the sorted dispatch's kernel, which torch lacks); norms, activations and softmaxes are not
counted, as in the literature's ``2 N`` per token convention. Attention is counted on CPU too (this module gives
``FlopCounterMode`` the formula of torch's CPU attention kernel).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "LLAVA_EXAMPLE_TEXT_TOKENS",
    "active_parameter_share",
    "count_flops",
    "example_input",
    "model_cost",
    "parameter_counts",
]


def _register_cpu_attention_flops() -> None:
    """``FlopCounterMode`` counts the CUDA attention kernels but not CPU's
    ``aten._scaled_dot_product_flash_attention_for_cpu`` (what ``F.scaled_dot_product_attention`` runs on CPU):
    attention counted 0 there. Give it torch's own SDPA formulas (``4 B H S_q S_kv d`` forward)."""
    from torch.utils import flop_counter

    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward.default not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(forward)
        def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    if backward is not None and backward.default not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(backward)
        def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_attention_flops()

#: Text tokens after the image placeholders in a MoE-LLaVA example (:func:`example_input`).
LLAVA_EXAMPLE_TEXT_TOKENS = 32


def example_input(model: nn.Module) -> Any:
    """One example sample of ``model``'s input contract, batch size 1, zeros/ones of the configured sizes:

    - a MoE-LLaVA (transformers contract): ``{"input_ids", "attention_mask", "images"}``, one image of
      ``pretrained_cfg["input_size"]`` and its ``num_image_tokens`` placeholders followed by
      :data:`LLAVA_EXAMPLE_TEXT_TOKENS` text tokens;
    - an open_clip-contract model (LIMoE, VLMo): ``(image, text)``, a text of ``context_length`` non-padding tokens,
      and a model with the audio modality (``audio_size``, LIMoE's ``audio=True``) ``(image, text, audio)``, zero
      features ``[1, *audio_size]``;
    - a timm-contract classifier (V-MoE, Soft MoE): ``image [1, C, H, W]``.
    """
    device = next(model.parameters()).device
    cfg = getattr(model, "pretrained_cfg", None) or {}
    image = torch.zeros(1, *cfg.get("input_size", (3, 224, 224)), device=device)
    config = getattr(model, "config", None)
    if hasattr(model, "num_image_tokens") and hasattr(config, "image_token_id"):
        text = torch.full((1, LLAVA_EXAMPLE_TEXT_TOKENS), int(config.text_config.bos_token_id or 1), device=device)
        placeholders = torch.full((1, model.num_image_tokens), int(config.image_token_id), device=device)
        input_ids = torch.cat([placeholders, text], dim=1)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "images": image}
    if hasattr(model, "encode_text"):
        length = int(cfg.get("context_length") or getattr(model, "context_length", 77))
        text = torch.ones(1, length, dtype=torch.long, device=device)
        audio_size = getattr(model, "audio_size", None)
        if audio_size is not None:
            return image, text, torch.zeros(1, *audio_size, device=device)
        return image, text
    return image


def active_parameter_share(layer: nn.Module) -> float | None:
    """The share ``k / E`` of an MoE layer's routed expert parameters one token uses (see the module docstring),
    or None for a module that is not an MoE layer."""
    from .layers.moe import MoE
    from .layers.routers import ExpertChoiceRouter, ModalityRouter
    from .layers.soft_moe import SoftMoE

    if isinstance(layer, SoftMoE):
        return 1.0
    if not isinstance(layer, MoE):
        return None
    router, num_experts = layer.router, layer.num_experts
    if isinstance(router, ExpertChoiceRouter):
        return min(1.0, router.capacity_factor / num_experts)
    if isinstance(router, ModalityRouter):
        return 1.0 / num_experts
    return router.top_k / num_experts


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"total_params", "active_params", "expert_params"}`` of ``model`` (see the module docstring)."""
    total = sum(p.numel() for p in model.parameters())
    expert = active_expert = 0.0
    for layer in model.modules():
        share = active_parameter_share(layer)
        if share is None:
            continue
        count = sum(p.numel() for p in layer.experts.parameters())
        expert += count
        active_expert += share * count
    return {
        "total_params": int(total),
        "active_params": int(round(total - expert + active_expert)),
        "expert_params": int(expert),
    }


def count_flops(model: nn.Module, example: Any) -> int:
    """FLOPs of ``model(*example)`` (a tuple), ``model(**example)`` (a mapping) or ``model(example)``, counted by
    ``FlopCounterMode`` without gradients, in eval mode and with dropless routing; the mode is restored after."""
    from torch.utils.flop_counter import FlopCounterMode

    from .layers.moe import eval_capacity

    device = next(model.parameters()).device
    example = torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, example)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), eval_capacity(model, None), FlopCounterMode(display=False) as counter:
            if isinstance(example, Mapping):
                model(**example)
            elif isinstance(example, (tuple, list)):
                model(*example)
            else:
                model(example)
    finally:
        model.train(training)
    return int(counter.get_total_flops())


def model_cost(model: nn.Module, example: Any) -> dict[str, int]:
    """Parameters (:func:`parameter_counts`) and the active FLOPs per sample ``flops`` on ``example`` (a batch of
    one sample, see :func:`count_flops`)."""
    return {**parameter_counts(model), "flops": count_flops(model, example)}
