"""mome's timm-contract families in timm's own registry: ``timm.create_model("vmoe_s32_e8")`` after ``import mome``.

V-MoE and Soft-MoE ViTs follow timm's model contract (``forward_features``, ``forward_head``,
``reset_classifier``, ``pretrained_cfg``), so they are also registered with ``timm.models.register_model``
under the same names, as thin entrypoints that call :func:`mome.create_model`. timm's call
conventions are honoured:

- ``timm.create_model("vmoe_s32_e8.<tag>", pretrained=True)``: timm hands the tag as ``pretrained_cfg``;
  mome's card of that tag is used (fetched, converted and loaded exactly, as ``mome.create_model`` does);
- ``timm.create_model("hf-hub:<repo>", pretrained=True)`` and ``"local-dir:<folder>"`` for a folder
  written by :func:`mome.save_pretrained` / :func:`mome.push_to_hub`: timm reads its ``config.json``
  (``architecture``, ``model_args``, ``pretrained_cfg``: the layout timm's own ``push_to_hf_hub`` writes),
  then calls the entrypoint with the source in ``pretrained_cfg``; the weights load exactly through mome;
  without ``pretrained=True`` timm builds the saved architecture with fresh weights, as for its own models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ._errors import InvalidArgumentError
from ._factory import create_model
from ._pretrained import CFG_FIELDS
from ._registry import list_models, model_module

__all__ = ["TIMM_FAMILIES", "register_timm_families", "timm_entrypoint"]

#: The families whose models follow timm's contract (the last part of their module's name).
TIMM_FAMILIES = ("vmoe", "soft_moe_vit")


def _cfg_dict(pretrained_cfg: Any) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` argument (None, a tag, a dict or timm's ``PretrainedCfg``) as a dict."""
    if pretrained_cfg is None or isinstance(pretrained_cfg, str):
        return {}
    if isinstance(pretrained_cfg, Mapping):
        return dict(pretrained_cfg)
    if dataclasses.is_dataclass(pretrained_cfg):
        return dataclasses.asdict(pretrained_cfg)
    raise InvalidArgumentError("pretrained_cfg", "a tag, a mapping or a PretrainedCfg", type(pretrained_cfg).__name__)


def timm_entrypoint(arch: str) -> Callable[..., nn.Module]:
    """A timm entrypoint named ``arch`` that builds mome's ``arch`` through :func:`mome.create_model`."""

    def entrypoint(
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        pretrained_model_args: Mapping[str, Any] | None = None,  # timm's record of a saved model's args
        **kwargs: Any,
    ) -> nn.Module:
        source_cfg = _cfg_dict(pretrained_cfg)
        source = source_cfg.get("source")
        if source in ("hf-hub", "local-dir"):
            if not pretrained:  # timm: the saved architecture (its model_args are in kwargs), fresh weights
                return create_model(arch, **kwargs)
            location = source_cfg["hf_hub_id"] if source == "hf-hub" else source_cfg["file"]
            return create_model(f"{source}:{location}", cache_dir=cache_dir, **kwargs)
        name = f"{arch}.{pretrained_cfg}" if isinstance(pretrained_cfg, str) and pretrained_cfg else arch
        overlay = {**source_cfg, **(pretrained_cfg_overlay or {})}
        overlay = {k: v for k, v in overlay.items() if k in CFG_FIELDS and k not in ("architecture", "tag")}
        return create_model(
            name, pretrained=pretrained, pretrained_cfg_overlay=overlay or None, cache_dir=cache_dir, **kwargs
        )

    entrypoint.__name__ = entrypoint.__qualname__ = arch
    entrypoint.__module__ = f"mome.models.{model_module(arch)}"  # timm files it under the family's name
    entrypoint.__doc__ = f"mome's ``{arch}`` for ``timm.create_model`` (built by ``mome.create_model``)."
    return entrypoint


def register_timm_families() -> list[str]:
    """Register every model of :data:`TIMM_FAMILIES` in timm's registry; returns their names.

    A name timm already has (one of timm's own models) is left alone.
    """
    from timm.models import is_model as timm_is_model
    from timm.models import register_model as timm_register_model

    registered = []
    for arch in list_models(module=list(TIMM_FAMILIES)):
        if not timm_is_model(arch):
            timm_register_model(timm_entrypoint(arch))
            registered.append(arch)
    return registered
