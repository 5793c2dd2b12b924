"""Saving models: ``save_pretrained`` (one folder: config, weights, tokenizer, model card) and ``push_to_hub``.

The folder is the layout timm and open_clip converged on, so ``mome.create_model("local-dir:...")``,
``mome.create_model("hf-hub:...")`` and ``timm.create_model("hf-hub:...")`` (timm-contract families)
read it: ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``, the ``files`` written),
``model.safetensors``, the tokenizer files when the model's tokenizer is a Hugging Face one at hand, and
a ``README.md`` model card with Hub front-matter. A model with LoRA experts (:mod:`mome.peft`) is saved as its base
architecture's weights plus its adapters (``adapter_config.json``, ``adapter_model.safetensors``), which
``create_model("local-dir:...")`` adds back.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ._checkpoint import CONFIG_NAME, WEIGHTS_NAME
from ._errors import InvalidArgumentError, PretrainedUnavailableError, UnknownModelError, UnsupportedModelError
from ._folders import hidden_sibling, remove_stale_siblings, swap_into_place
from ._pretrained import TRANSFORMERS_FORMAT, PretrainedCfg
from ._quantize import quantization_of
from ._registry import is_model, model_module, split_model_name_tag
from ._tokenizer import create_tokenizer
from .peft import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, has_lora_experts, save_lora_experts, without_lora_experts

__all__ = ["check_save_target", "model_card", "push_to_hub", "save_pretrained"]

_MANIFEST_KEY = "files"  # config.json lists the files save_pretrained wrote, so a re-save may replace them
_README_NAME = "README.md"


def _to_list(value: str | tuple[str, ...] | None) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _tokenizer_files(cfg: PretrainedCfg, folder: Path) -> list[str]:
    """Save the model's Hugging Face tokenizer into ``folder`` if it is at hand; returns the files written.

    Hub and built-in (``mome:``) tokenizers are Hugging Face tokenizers and are saved; open_clip's
    ship inside open_clip (nothing to write). A Hub tokenizer missing from the local cache is skipped
    with a warning: the folder still loads, ``mome.get_tokenizer`` then needs the cache.
    """
    if not cfg.tokenizer or cfg.tokenizer.startswith("open_clip:"):
        return []
    try:
        tokenizer = create_tokenizer(cfg.tokenizer)
    except PretrainedUnavailableError as err:
        warnings.warn(f"save_pretrained: tokenizer files not written: {err}", UserWarning, stacklevel=3)
        return []
    hf_tokenizer = getattr(tokenizer, "tokenizer", None)
    if not hasattr(hf_tokenizer, "save_pretrained"):
        return []
    before = {p.name for p in folder.iterdir()}
    hf_tokenizer.save_pretrained(str(folder))
    return sorted(p.name for p in folder.iterdir() if p.name not in before)


def _results_table(results: Mapping[str, Any]) -> list[str]:
    """``results`` (benchmark -> metric -> value, or benchmark -> value) as Markdown table rows."""
    rows = ["| benchmark | metric | value |", "|---|---|---|"]
    for bench, value in results.items():
        metrics = value if isinstance(value, Mapping) else {"": value}
        rows += [f"| {bench} | {metric} | {number} |" for metric, number in metrics.items()]
    return rows


def model_card(arch: str, args: Mapping[str, Any], cfg: PretrainedCfg, repo_id: str | None = None) -> str:
    """The ``README.md`` of a saved folder: Hub front-matter, architecture, how to load, results, source."""
    import yaml

    family = model_module(arch).lstrip("_") if is_model(arch) else ""
    meta: dict[str, Any] = {"library_name": "mome"}
    if cfg.license:
        meta["license"] = cfg.license
    meta["tags"] = ["mome", "mixture-of-experts", *([family] if family else [])]
    name = f"{arch}.{cfg.tag}" if cfg.tag else arch
    load = f"hf-hub:{repo_id}" if repo_id else "local-dir:/path/to/this/folder"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    if cfg.paper_name:
        lines += [
            f"Paper: {cfg.paper_name}" + (f" ({', '.join(_to_list(cfg.paper_ids))})" if cfg.paper_ids else ""),
            "",
        ]
    lines += ["## Architecture", "", f"`{arch}`, built by `mome.create_model` with:", "", "```json"]
    lines += [json.dumps(dict(args), indent=2, sort_keys=True), "```", ""]
    data = {k: cfg.get(k) for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "tokenizer")}
    data = {k: v for k, v in data.items() if v is not None}
    if data:
        lines += ["Preprocessing: " + ", ".join(f"{k}={v}" for k, v in data.items()), ""]
    lines += ["## How to load", "", "```python", "import mome", "", f'model = mome.create_model("{load}")']
    if cfg.tokenizer:
        lines.append(f'tokenizer = mome.get_tokenizer("{load}")')
    lines += ["```", ""]
    if cfg.results:
        lines += [
            "## Results",
            "",
            "Reported by the upstream authors for these weights:",
            "",
            *_results_table(cfg.results),
        ]
        lines.append("")
    source = cfg.url or (f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else None)
    if source or cfg.notes:
        lines += ["## Source", ""]
        if source:
            lines.append(f"Converted from {source} ({cfg.source_format} format).")
        if cfg.notes:
            lines.append(cfg.notes.strip())
        lines.append("")
    return "\n".join(lines)


def check_save_target(directory: str | Path) -> None:
    """Raise ``FileExistsError`` unless :func:`save_pretrained` may write ``directory``: absent, or a folder holding
    nothing but the files an earlier save wrote (its ``config.json``'s ``files``). A file there (not a folder) and
    a folder with other files are refused by name. Reads only; callers check before any expensive work."""
    directory = Path(directory).expanduser()
    if not directory.exists():
        return
    if not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder; not replacing it")
    ours = {CONFIG_NAME, WEIGHTS_NAME}
    try:
        ours |= set(json.loads((directory / CONFIG_NAME).read_text()).get(_MANIFEST_KEY, []))
    except (OSError, ValueError, AttributeError, TypeError):  # no or a broken config.json: only the two files
        pass
    extra = sorted(p.name for p in directory.iterdir() if p.name not in ours)
    if extra:
        raise FileExistsError(f"{directory} exists and holds other files ({extra}); not replacing it")


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    *,
    model_name: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write a saved folder, readable by ``create_model("local-dir:...")`` and ``"hf-hub:..."``.

    The folder holds ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg`` and the list
    of ``files`` written; ``quantization`` for a model :func:`mome.quantize` quantized, whose
    ``model.safetensors`` then holds each quantized weight's int data and scales), ``model.safetensors``, the
    tokenizer files when the model's tokenizer is a Hugging Face one at hand, and a ``README.md`` model card
    (``repo_id`` is the Hub repo it names).
    ``model_name``/``model_args`` default to what :func:`create_model` recorded on the model. The
    folder is written next to ``directory`` and swapped into place (:mod:`mome._folders`), so the target
    holds a complete save, the earlier or the new one; an existing folder is replaced only if it holds
    nothing but files an earlier save wrote (:func:`check_save_target`; a file there is refused too). Hidden
    leftovers of saves killed earlier are removed.
    """
    from safetensors import torch as st

    arch = split_model_name_tag(model_name or getattr(model, "mome_model_name", None) or "")[0]
    if not arch:
        raise InvalidArgumentError(
            "model_name",
            "passed as model_name= (the model was not built by mome.create_model)",
            model_name,
            "save_pretrained",
        )
    if not is_model(arch):
        raise UnknownModelError(f"save_pretrained: unknown model {arch!r}; see mome.list_models()")
    args = dict(model_args if model_args is not None else getattr(model, "mome_model_args", {}))
    for key, value in args.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as err:
            raise InvalidArgumentError(
                f"model_args[{key!r}]",
                "JSON-serialisable (pass model_args= with a JSON form the entrypoint accepts)",
                value,
                "save_pretrained",
            ) from err
    cfg = getattr(model, "pretrained_cfg", None)
    cfg = cfg if isinstance(cfg, PretrainedCfg) else PretrainedCfg()
    cfg = cfg.replace(architecture=arch)
    if cfg.source_format == TRANSFORMERS_FORMAT:  # nothing is written: mome's folder could not rebuild it
        raise UnsupportedModelError(
            f"save_pretrained: {arch} is built from a transformers repo by its zoo card; save it with the model's "
            "own save_pretrained and load that folder with mome.create_model(CARD, pretrained=True, "
            "pretrained_cfg_overlay=dict(file=FOLDER))"
        )

    directory = Path(directory).expanduser()
    check_save_target(directory)
    remove_stale_siblings(directory)  # what earlier saves killed mid-way left behind
    tmp = hidden_sibling(directory)
    try:
        with without_lora_experts(model) as base:  # the architecture's weights, under its own names
            st.save_model(base, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        files = [WEIGHTS_NAME, *_tokenizer_files(cfg, tmp), _README_NAME, CONFIG_NAME]
        if has_lora_experts(model):  # and its LoRA experts, which create_model("local-dir:...") adds back
            save_lora_experts(model, tmp)
            files[1:1] = [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
        (tmp / _README_NAME).write_text(model_card(arch, args, cfg, repo_id))
        config = {"architecture": arch, "model_args": args, "pretrained_cfg": cfg.to_dict(), _MANIFEST_KEY: files}
        quantization = quantization_of(model)
        if quantization:  # create_model("local-dir:...") quantizes the rebuilt model the same way before loading
            config["quantization"] = quantization
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        swap_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    model_name: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload mome model",
    create_pr: bool = False,
) -> str:
    """Save ``model`` (:func:`save_pretrained`) and upload the folder to the Hub repo ``repo_id``.

    The repo is created if missing (``private`` as given). Returns the commit URL. The uploaded repo
    loads with ``mome.create_model("hf-hub:<repo_id>")``.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mome-push-") as tmp:
        folder = save_pretrained(
            model, Path(tmp) / "model", model_name=model_name, model_args=model_args, repo_id=repo_id
        )
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )
    return str(getattr(commit, "commit_url", commit))
