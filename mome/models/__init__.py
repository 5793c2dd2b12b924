"""mome's model families, one per file.

Importing this package registers the families that need only torch and timm (V-MoE, Soft-MoE ViT,
LIMoE, VLMo, VL-MoE) and declares MoE-LLaVA and Uni-MoE, which need transformers, as lazy families: a module is
imported the first time one of its names (``moe_llava_*``, ``uni_moe_*``) is looked up or the models are listed
(:func:`mome.register_lazy_family`), so ``import mome`` does not import transformers.
"""

from .. import _registry
from . import limoe as limoe
from . import soft_moe_vit as soft_moe_vit
from . import vl_moe as vl_moe
from . import vlmo as vlmo
from . import vmoe as vmoe
from ._moe_vit import MoEVisionTransformer as MoEVisionTransformer
from ._moe_vit import resolve_moe_layers as resolve_moe_layers

_registry.register_lazy_family(f"{__name__}.moe_llava", "moe_llava_*")
_registry.register_lazy_family(f"{__name__}.uni_moe", "uni_moe_*")  # built on MoE-LLaVA: transformers too
#: transformers' multimodal MoE models (:mod:`mome.models.hf_moe_vlm`), lazy for the same reason
HF_MOE_VLM_ARCHS = (
    "qwen3_vl_moe_*",
    "ernie4_5_vl_moe_*",
    "glm4v_moe_*",
    "glm4_5v_*",
    "llama4_*",
    "aria_*",
    "qwen3_omni_moe_*",
)
_registry.register_lazy_family(f"{__name__}.hf_moe_vlm", HF_MOE_VLM_ARCHS)


def __getattr__(name: str):
    """``mome.models.moe_llava`` on attribute access imports the lazy family (as ``import`` would)."""
    if name in ("moe_llava", "uni_moe", "hf_moe_vlm"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
