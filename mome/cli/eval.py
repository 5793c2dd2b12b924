"""``mome-eval``: evaluate a model of the zoo or a ``mome-train`` checkpoint with Lightning (``conf/eval.yaml``).

The run composes the ``data``, ``model``, ``moe``, ``eval_task``, ``trainer``, ``logger``, ``paths``, ``hydra`` and
``debug`` groups (``mome-train``'s ``callbacks`` act on training only, so they are not a group here), then:

1. builds the model: ``ckpt_path=`` alone rebuilds the model a ``mome-train`` checkpoint names in its
   hyper-parameters (:func:`mome.lit.base.model_from_checkpoint`); ``model=<name>`` (a config of ``conf/model``,
   or any name ``create_model`` takes: a registry name, ``arch.tag``, ``local-dir:`` or ``hf-hub:``, answered
   by the ``mome-model://`` config source, :mod:`mome.cli._model_source`) or ``model.model_name=`` builds that
   model (with a ``moe=`` recipe merged in), and with a ``ckpt_path=`` too loads the checkpoint into it
   strictly (missing and unexpected keys are an error);
2. builds the evaluation task (``eval_task=zero_shot|retrieval|linear_probe|classification|vqa``, see
   :mod:`mome.lit.eval_tasks` and :mod:`mome.lit.eval_vqa`), checks that the data module's class can feed
   it (``check_data``), the data module bound to the model's preprocessing and tokenizer (with
   ``train_augment=false``), the task's loaders of ``split=`` and the trainer; any configuration or input
   error stops here with one line and exit code 2, and the run's folder is removed;
3. ``trainer.test`` (Lightning's progress bars, any strategy: no sample is counted twice under DDP), then
   ``results.json`` (CLIP_benchmark schema) and the routing report (``routing.json`` and PNGs; with
   ``routing_maps: N``, the patch routing maps of the first N images, ``routing_patches.json`` and
   ``routing_patch_map.png``) in the run's output folder (``eval_task=vqa`` adds ``predictions.jsonl``), and
   a one-line summary.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from .._checkpoint import load_state_exactly
from .._errors import CheckpointMismatchError, MomeError
from .._quantize import MODES as QUANTIZATION_MODES
from .._quantize import quantization_of, quantize
from .._registry import split_model_name_tag
from .._resources import conf_dir
from ..lit import EvaluationTask
from ..lit.base import build_model, model_from_checkpoint, read_lightning_checkpoint
from ._common import (
    ConfigError,
    build_datamodule,
    build_trainer,
    check_moe,
    check_trainer,
    plain_container,
    run_cli,
    seed_everything,
    setup_phase,
)
from ._help import check_plugins

__all__ = ["evaluate", "load_model", "main", "quantize_for_eval"]


def _one_line(err: Exception) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The ``model.`` weights of a Lightning checkpoint (read with ``weights_only=True``)."""
    state = read_lightning_checkpoint(path)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


#: The ``weights`` field of the results (and the warning) for a model built without any trained weights.
RANDOM_WEIGHTS = "random initialisation"


def load_model(cfg: DictConfig) -> tuple[nn.Module, str, str, str]:
    """The model to evaluate, its name, its ``pretrained`` field (the weights' name, ``"none"`` without) and its
    ``weights`` field (where its weights come from: a checkpoint, a saved model, a pretrained card, or
    :data:`RANDOM_WEIGHTS`) for the results."""
    check_moe(cfg)
    spec = plain_container(cfg.get("model")) or {}
    spec = {k: v for k, v in spec.items() if v is not None or k == "model_name"}
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None:
        ckpt_path = Path(str(ckpt_path))
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    if not spec.get("model_name"):
        if ckpt_path is None:
            raise ConfigError("give ckpt_path=<mome-train checkpoint> or model=<name> / model.model_name=<name>")
        try:
            model = model_from_checkpoint(ckpt_path)
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(_one_line(err)) from err
        name = str(getattr(model, "mome_model_name", type(model).__name__))
        return model, name, str(ckpt_path), f"checkpoint {ckpt_path}"
    model = build_model(spec)
    name = str(spec["model_name"])
    if ckpt_path is not None:
        try:  # strict, and NaN/Inf refused, as every other route that loads weights
            load_state_exactly(model, _checkpoint_state(ckpt_path), "its weights")
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(f"ckpt_path={ckpt_path} does not fit {name}: {_one_line(err)}") from err
        return model, name, str(ckpt_path), f"checkpoint {ckpt_path}"
    if name.startswith(("local-dir:", "hf-hub:")):
        return model, name, name, f"saved model {name}"
    arch, tag = split_model_name_tag(name)
    if spec.get("checkpoint_path"):
        return model, arch, str(spec["checkpoint_path"]), f"checkpoint_path {spec['checkpoint_path']}"
    if spec.get("pretrained"):  # create_model loaded the card's weights (the tag's, else the default card's)
        return model, arch, tag or "default", f"pretrained {tag or 'default'}"
    return model, arch, "none", RANDOM_WEIGHTS  # a tag alone selects the card's architecture, not its weights


def quantize_for_eval(cfg: DictConfig, model: nn.Module, model_name: str) -> dict[str, Any] | None:
    """``quantize=int8|int4``: :func:`mome.quantize` the loaded model in place (its expert weights too) before the
    evaluation; returns the quantization the evaluated model carries (None: full precision), for the results.

    A model loaded from a quantized folder (``local-dir:``) keeps its own quantization; asking to quantize it again is
    a :class:`ConfigError`, as are an unknown mode and a group size without int4."""
    mode = cfg.get("quantize")
    group_size = cfg.get("quantize_group_size")
    if mode is None:
        if group_size is not None:
            raise ConfigError(f"quantize_group_size={group_size} needs quantize=int4")
        return quantization_of(model)
    if mode not in QUANTIZATION_MODES:
        raise ConfigError(f"quantize={mode}: unknown mode; give one of {', '.join(QUANTIZATION_MODES)} (or null)")
    loaded = quantization_of(model)
    if loaded:
        raise ConfigError(f"quantize={mode}: {model_name} is already quantized ({loaded['mode']}); drop quantize=")
    try:
        quantize(model, str(mode), group_size=group_size)
    except MomeError as err:
        raise ConfigError(f"quantize={mode}: {_one_line(err)}") from err
    return quantization_of(model)


def build_eval_task(cfg: DictConfig, model: nn.Module, model_name: str) -> EvaluationTask:
    """The ``eval_task`` node's class (a :class:`~mome.lit.EvaluationTask`) with its options."""
    node = cfg.get("eval_task")
    if node is None or "_target_" not in node:
        choice = HydraConfig.get().runtime.choices.get("eval_task") if HydraConfig.initialized() else None
        known = sorted(p.stem for p in (Path(conf_dir()) / "eval_task").glob("*.yaml"))
        raise ConfigError(f"eval_task={choice}: unknown evaluation task; known: {', '.join(known)}")
    kwargs = plain_container(node)
    target = kwargs.pop("_target_")
    try:
        task_class = get_class(target)
    except Exception as err:
        raise ConfigError(f"eval_task._target_={target}: {_one_line(err)}") from err
    if not (isinstance(task_class, type) and issubclass(task_class, EvaluationTask)):
        raise ConfigError(f"eval_task._target_={target} is not a mome.lit.EvaluationTask")
    try:
        return task_class(
            model,
            model_name=model_name,
            routing_report=bool(cfg.get("routing_report", True)),
            routing_maps=_routing_maps(cfg.get("routing_maps", 8)),
            eval_capacity=cfg.get("eval_capacity", "dropless"),
            **kwargs,
        )
    except TypeError as err:
        raise ConfigError(f"eval_task ({task_class.__name__}): {err}") from err


def _routing_maps(value: Any) -> int:
    """``routing_maps=``: how many images get a patch routing map (0: none)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"routing_maps={value}: give a number of images >= 0 (0 turns the patch maps off)")
    return value


def _data_class(cfg: DictConfig) -> type | None:
    """The class ``cfg.data`` instantiates, or None when it cannot be resolved (``build_datamodule`` says why)."""
    target = cfg.data.get("_target_") if cfg.get("data") is not None else None
    try:
        found = get_class(str(target)) if target else None
    except Exception:
        return None
    return found if isinstance(found, type) else None


def _dataset_name(cfg: DictConfig, datamodule: Any) -> str:
    if cfg.get("dataset_name"):
        return str(cfg.dataset_name)
    return type(datamodule).__name__.removesuffix("DataModule").lower() or "dataset"


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one evaluation from a composed config; returns ``(results record, objects)``."""
    with setup_phase():
        seed_everything(cfg)
        check_trainer(cfg)
        model, model_name, pretrained, weights = load_model(cfg)
        quantization = quantize_for_eval(cfg, model, model_name)
        task = build_eval_task(cfg, model, model_name)
        data_class = _data_class(cfg)
        if data_class is not None:
            task.check_data(data_class)  # before binding: e.g. conversations bind only to a LLaVA model
        with open_dict(cfg):
            if "train_augment" in cfg.data:
                cfg.data.train_augment = False  # evaluation never augments (linear probe's train split too)
            if not task.needs_text and cfg.data.get("task") == "image_text":
                cfg.data.task = "classification"  # labels suffice: no captions to tokenize
        datamodule = build_datamodule(cfg, task)
        split = str(cfg.get("split", "test"))
        loaders = task.dataloaders(datamodule, split, cfg.get("max_samples"))
        trainer = build_trainer(cfg)
    if weights == RANDOM_WEIGHTS and trainer.is_global_zero:
        print(
            f"mome-eval: warning: {model_name} has no trained weights (no ckpt_path=, no model.pretrained=true or "
            f"model.checkpoint_path=): {RANDOM_WEIGHTS}, its metrics are those of an untrained model",
            file=sys.stderr,
        )
    output_dir = Path(cfg.paths.output_dir)
    resolved = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str)
    task.output_dir = output_dir
    task.record_fields = {
        "dataset": _dataset_name(cfg, datamodule),
        "model": model_name,
        "pretrained": pretrained,
        "weights": weights,
        "split": split,
        "quantization": quantization,
        "config_hash": hashlib.sha256(resolved.encode()).hexdigest()[:12],
    }
    task.measure_cost = bool(cfg.get("cost", True))  # in the test processes: a spawned one gets a model not yet run
    trainer.test(task, dataloaders=loaders, verbose=False)
    objects = {"cfg": cfg, "task": task, "datamodule": datamodule, "trainer": trainer, "output_dir": output_dir}
    if not trainer.is_global_zero:  # rank 0 writes the results
        return {}, objects
    record = json.loads((output_dir / "results.json").read_text())
    print(_summary(record, output_dir))
    return record, objects


def _summary(record: dict[str, Any], output_dir: Path) -> str:
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in record["metrics"].items())
    weights = record["pretrained"] + (f": {RANDOM_WEIGHTS}" if record.get("weights") == RANDOM_WEIGHTS else "")
    return (
        f"mome-eval: {record['model']} ({weights}) on {record['dataset']} {record['task']}: {metrics} "
        f"({record['n_samples']} samples{_drops(record.get('routing'))}{_cost(record.get('cost'))}); "
        f"results in {output_dir / 'results.json'}"
    )


def _cost(cost: dict[str, int] | None) -> str:
    """``, active params 1.2M of 3.4M total (experts 2.9M), active FLOPs 9.3M per sample`` (``mome._flops``)."""
    if not cost:
        return ""
    from ..lit.callbacks import format_cost

    return f", {format_cost(cost)}"


def _drops(routing: dict[str, Any] | None) -> str:
    """``, eval_capacity=dropless, dropped 0.0% of routed tokens`` (and the layer and modality that dropped most)."""
    if not routing:
        return ""
    dropped = 100 * routing["dropped_fraction"]
    text = f", eval_capacity={routing['eval_capacity']}, dropped {dropped:.1f}% of routed tokens"
    worst = [
        (fraction, f"{layer} {modality}")
        for layer, entry in routing["layers"].items()
        for modality, fraction in entry["per_modality"].items()
    ]
    if worst and max(worst)[0] > 0:
        fraction, where = max(worst)
        text += f" (most: {100 * fraction:.1f}% in {where})"
    return text


def _job(cfg: DictConfig) -> dict[str, Any]:
    return evaluate(cfg)[0]


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    run_cli("mome-eval", _job, cfg)


def main() -> None:
    """The ``mome-eval`` console script (see the module docstring)."""
    check_plugins("mome-eval", sys.argv[1:])  # before Hydra composes the config a missing plugin cannot load
    _hydra_main()


if __name__ == "__main__":
    main()
