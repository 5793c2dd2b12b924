"""The pretrained config ("card") of one set of weights: timm's ``PretrainedCfg`` with mome's fields.

A card says where the weights are (Hub file, URL, local file), in which upstream format and with which
converter, how to feed the model (input size, normalisation, tokenizer), where the weights come from
(license, paper, results) and which entrypoint kwargs they need. Cards are data: the zoo's YAML files
(:mod:`mome.zoo`) hold exactly these fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CFG_FIELDS", "NATIVE_FORMAT", "TRANSFORMERS_FORMAT", "PretrainedCfg"]

#: The format of mome's own saved weights (``model.safetensors`` with mome's key names).
NATIVE_FORMAT = "mome"
#: A transformers ``save_pretrained`` repo of a model mome runs as transformers' own class (the MoE VLMs of
#: :mod:`mome.models.hf_moe_vlm`): the whole repo is fetched and the class's ``from_pretrained`` reads it, with
#: no converter (transformers' own key mapping applies); its processor holds the preprocessing.
TRANSFORMERS_FORMAT = "transformers"


@dataclass
class PretrainedCfg:
    """One checkpoint card (timm's ``PretrainedCfg``, with mome's multimodal and provenance fields).

    Fixed fields only: an unknown key is a ``TypeError``. Lists given for ``input_size``, ``mean``,
    ``std`` and ``paper_ids`` (YAML, JSON) become tuples. ``cfg.get(key)`` / ``cfg[key]`` read
    fields by name, so timm's ``resolve_model_data_config(model)`` accepts ``model.pretrained_cfg``.
    """

    # weight source
    hf_hub_id: str | None = None
    hf_hub_filename: str | None = None
    # Hub revision of ``hf_hub_id``: a 40-hex commit pins it; a branch name (``main``) follows the repo
    revision: str | None = None
    # other Hub repos read with ``hf_hub_id`` (folder name -> repo id), fetched and laid out beside it
    hf_hub_companions: dict[str, str] = field(default_factory=dict)
    url: str | None = None
    file: str | None = None
    sha256: str | None = None
    source_format: str = NATIVE_FORMAT  # "mome", "vmoe", "unilm_vlmo", "timm", "open_clip", ...
    converter: str | None = None
    # options of the converter (e.g. ``ignore_prefixes``), passed as keyword arguments
    converter_options: dict[str, Any] = field(default_factory=dict)
    # data
    input_size: tuple[int, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    num_classes: int | None = None
    context_length: int | None = None
    tokenizer: str | None = None
    # provenance
    license: str | None = None
    paper_ids: str | tuple[str, ...] | None = None
    paper_name: str | None = None
    notes: str | None = None
    origin_url: str | None = None
    results: dict[str, Any] = field(default_factory=dict)
    # entrypoint kwargs this checkpoint needs (image size, classes, ...); the caller's kwargs win
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # filled in by the registry
    architecture: str | None = None
    tag: str | None = None

    def __post_init__(self) -> None:
        for name in ("input_size", "mean", "std", "paper_ids"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PretrainedCfg:
        unknown = sorted(set(values) - CFG_FIELDS)
        if unknown:
            raise TypeError(f"unknown PretrainedCfg field(s) {unknown}; the fields are {sorted(CFG_FIELDS)}")
        return cls(**values)

    def has_weights(self) -> bool:
        """Whether the card names a weight source (``file``, ``hf_hub_id`` or ``url``), as in timm."""
        return bool(self.file or self.hf_hub_id or self.url)

    def needs_conversion(self) -> bool:
        """Whether a converter maps the checkpoint onto the model (every foreign format but transformers')."""
        if self.source_format == TRANSFORMERS_FORMAT:
            return False
        return self.source_format != NATIVE_FORMAT or self.converter not in (None, NATIVE_FORMAT)

    def is_whole_repo(self) -> bool:
        """Whether the checkpoint is a whole Hub repo (a foreign format without ``hf_hub_filename``)."""
        foreign = self.needs_conversion() or self.source_format == TRANSFORMERS_FORMAT
        return bool(self.hf_hub_id) and self.hf_hub_filename is None and foreign

    def to_dict(self, remove_null: bool = True) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {k: v for k, v in values.items() if not (remove_null and v is None)}

    def replace(self, **changes: Any) -> PretrainedCfg:
        return PretrainedCfg.from_dict({**self.to_dict(remove_null=False), **changes})

    def __getitem__(self, key: str) -> Any:
        if key not in CFG_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key) if key in CFG_FIELDS else None
        return default if value is None else value


CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(PretrainedCfg))
