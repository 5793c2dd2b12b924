"""VL-MoE: VLMo's multiway Transformer with sparse mixture-of-experts modality FFNs.

Paper: "Scaling Vision-Language Models with Sparse Mixture of Experts", Shen, Yao, Li, Darrell, Keutzer,
He, 2023 (https://arxiv.org/abs/2303.07226). No official code and no checkpoint has been published that
we know of (none is listed in the paper or in a public model hub we could check): these variants are
randomly initialised; train them (``conf/experiment/vl_moe_digits.yaml`` on the embedded digits).

A VL-MoE is a :class:`~mome.models.vlmo.VLMo` built with ``moe_layers`` and ``moe`` (not a copy of it): the
shared self-attention, the three paths (image only, text only, fusion), the heads and the stagewise
pre-training (:class:`~mome.lit.VLMoTask`: image, then text with the image path frozen, then image-text)
are VLMo's. In the MoE blocks (every other block, ``1, 3, 5, ...``, as V-MoE) the V-FFN and the L-FFN
are each a sparse MoE of ``E`` experts, V-MoE for image tokens and T-MoE for text tokens
(:class:`~mome.layers.MultiwayFFN` with ``moe=``); the VL-FFN of the top blocks stays dense:

    x' = x + gamma_1 * Attn(LN_1(x))                                        (shared)
    y  = x' + gamma_2 * sum_{j<k} G_{m,j}(z) FFN_{m, e_j(z)}(z),  z = LN_m(x')   MoE block, m = image | text
    y  = x' + gamma_2 * FFN_m(LN_m(x'))                                     dense block
    y  = x' + gamma_2 * FFN_vl(LN_vl(x'))                                   fusion blocks i >= vlffn_start

with V-MoE's router for each modality ``m``: ``G_m(z) = TOP_k(softmax(z W_m + eps))``,
``eps ~ N(0, (1/E)^2)`` at training time, no renormalisation; per modality a capacity of
``ceil(T_m k c / E)`` rounded up to a multiple of 4 over its ``T_m`` tokens of the pass, batch-prioritised
routing (tokens with the largest top gate are served first), and V-MoE's auxiliary losses on each
modality's router,

    L_imp  = CV(sum_t p_t)^2,     L_load = CV(sum_t P(e in top-k(z_t W + eps')))^2,   weight 0.005 each,

added to the task loss (:class:`~mome.lit.VLMoTask` sums them over the passes of a step).

Sizes (:data:`VL_MOE_DEFAULTS` and the entrypoints). The paper scales VLMo-Base and VLMo-Large with E
experts per modality. Registered here: ``vl_moe_base_patch16_224_e32`` (VLMo-Base, E=32) and
``vl_moe_large_patch16_224_e32`` (VLMo-Large, E=32), both k=1, MoE every other block. [UNVERIFIED]: these
numbers (E=32, k=1, every other block, capacity factor 1.05, loss weights 0.005) are recalled from the paper
and V-MoE's recipe, not read from a released config (there is none); override them with ``num_experts``,
``top_k``, ``moe_layers`` and ``moe_kwargs``. Parameter names are VLMo's; the sparse experts of block ``i``
are ``blocks.i.mlp.sparse.{image,text}.{router.proj,experts.*}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._checks import check_int, check_top_k
from .._errors import InvalidArgumentError, UnsupportedOptionError
from .._registry import register_model
from ._moe_vit import building, parameter_names, reject_unknown_options
from .vlmo import VLMO_SIZES, VLMo

__all__ = ["VL_MOE_DEFAULTS", "create_vl_moe"]

#: The sparse-expert options of VL-MoE's V-MoE and T-MoE layers ([UNVERIFIED] values; see the module docstring).
VL_MOE_DEFAULTS: dict[str, Any] = {
    "batch_priority": True,
    "capacity_factor": 1.05,
    "capacity_multiple": 4,
    "aux_loss_weights": {"importance": 0.005, "load": 0.005},
}
PAPER = ("arXiv:2303.07226", "Scaling Vision-Language Models with Sparse Mixture of Experts")
#: what every VL-MoE's card (``model.pretrained_cfg``) says about weights
NO_PUBLIC_WEIGHTS = (
    "No VL-MoE weights, configuration or code are public (the paper, arXiv:2303.07226, releases none): the variants "
    "are randomly initialised, and the paper-size E, k and loss weights are the paper's text, not a released config."
)
#: VLMo's arguments a VL-MoE takes as they are (``moe`` is built from the arguments below).
_VLMO_ARGS = [name for name in parameter_names(VLMo) if name != "moe"]


def create_vl_moe(
    arch: str,
    /,
    *,
    num_experts: int,
    top_k: int = 1,
    router: str = "noisy_top_k",
    moe_layers: str | Sequence[int] = "every_2",
    moe_kwargs: Mapping[str, Any] | None = None,
    **vlmo_kwargs: Any,
) -> VLMo:
    """A :class:`~mome.models.vlmo.VLMo` whose V-FFN and L-FFN in ``moe_layers`` are sparse MoE layers of
    ``num_experts`` experts with top-``top_k`` ``router`` routing, :data:`VL_MOE_DEFAULTS` under ``moe_kwargs``
    (:class:`~mome.layers.SparseMoE` options). Errors name ``arch``; a keyword neither these nor VLMo take is an
    :class:`~mome.UnsupportedOptionError`."""
    reason = "not an argument of VLMo or of the VL-MoE entrypoints (num_experts, top_k, router, moe_kwargs)"
    reject_unknown_options(arch, vlmo_kwargs, _VLMO_ARGS, reason)
    check_int("num_experts", num_experts, owner=arch)
    check_top_k(top_k, num_experts, owner=arch)
    if moe_kwargs is not None and not isinstance(moe_kwargs, Mapping):
        raise InvalidArgumentError("moe_kwargs", "a mapping of SparseMoE options", moe_kwargs, arch)
    for name in ("num_experts", "top_k", "router"):
        if name in (moe_kwargs or {}):
            raise UnsupportedOptionError(f"moe_kwargs[{name!r}]", arch, f"give {name}= itself", moe_kwargs[name])
    moe = {"num_experts": num_experts, "top_k": top_k, "router": router, **VL_MOE_DEFAULTS, **(moe_kwargs or {})}
    with building(arch):
        model = VLMo(moe_layers=moe_layers, moe=moe, **vlmo_kwargs)
    model.pretrained_cfg = model.pretrained_cfg.replace(
        paper_ids=PAPER[0], paper_name=PAPER[1], notes=NO_PUBLIC_WEIGHTS
    )
    return model


@register_model
def vl_moe_base_patch16_224_e32(pretrained: bool = False, **kwargs: Any) -> VLMo:
    """VL-MoE-Base/16 E32: VLMo-Base (12 layers, width 768, 12 heads, VL-FFN in blocks 10-11) with E=32, k=1 sparse
    V-FFN and L-FFN in every other block (1, 3, ..., 11)."""
    args = {**VLMO_SIZES["base"], "num_experts": 32, "top_k": 1}
    return create_vl_moe("vl_moe_base_patch16_224_e32", **{**args, **kwargs})


@register_model
def vl_moe_large_patch16_224_e32(pretrained: bool = False, **kwargs: Any) -> VLMo:
    """VL-MoE-Large/16 E32: VLMo-Large (24 layers, width 1024, 16 heads, VL-FFN in blocks 21-23) with E=32, k=1
    sparse V-FFN and L-FFN in every other block (1, 3, ..., 23)."""
    args = {**VLMO_SIZES["large"], "num_experts": 32, "top_k": 1}
    return create_vl_moe("vl_moe_large_patch16_224_e32", **{**args, **kwargs})


@register_model
def vl_moe_tiny_patch8_32(pretrained: bool = False, **kwargs: Any) -> VLMo:
    """A tiny VL-MoE for tests and demos: ``vlmo_tiny_patch8_32`` (32px, patch 8, 4 layers of width 64, 4 heads,
    VL-FFN in blocks 2-3, vocabulary 1000, 16 text tokens) with E=4, k=1 sparse V-FFN and L-FFN in blocks 1 and 3;
    its init is vlmo_tiny_patch8_32's, scaled to the width (std ``0.02 * sqrt(768 / 64)``, layer scale 1.0), without
    which the dual encoder's features barely depend on the input at init and ITC collapses them."""
    args = {**VLMO_SIZES["tiny"], "num_experts": 4, "top_k": 1}
    return create_vl_moe("vl_moe_tiny_patch8_32", **{**args, **kwargs})
