"""``mome-train``: train a model of the zoo with Lightning, configured by Hydra (``conf/train.yaml``).

The run composes ``data``, ``model``, ``task``, ``trainer``, ``callbacks``, ``logger``, ``paths``,
``experiment``, ``debug`` and ``hparams_search`` groups (the lightning-hydra-template's layout), plus ``moe``
(a routing recipe of ``conf/moe`` merged into the model spec, checked against the model's family), then:

1. builds the task (which builds the model from its spec: ``model_name`` and kwargs), the data module (bound to the
   model's preprocessing and tokenizer, set up eagerly), callbacks, loggers and trainer; any
   configuration or input error stops here with one line naming the field, and the run's folder is
   removed;
2. ``trainer.fit`` (resuming from ``ckpt_path=``), then ``trainer.test`` on the best checkpoint;
3. saves the trained model as a mome folder ``<output_dir>/model`` (``create_model("local-dir:...")``),
   with ``export.push_to_hub=<org/name>`` uploads the same files to that Hub repo
   (``create_model("hf-hub:<org/name>")``), and prints a one-line summary.

Outputs go to ``logs/train/runs/<timestamp>/`` with Hydra's ``.hydra/`` folder. ``main`` returns the
value of ``optimized_metric`` for sweepers (Optuna).
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from omegaconf import DictConfig
from torch import nn
from torch.distributed.fsdp import FSDPModule

from .. import push_to_hub
from .._checkpoint import check_state_fits
from .._resources import conf_dir
from .._saving import save_pretrained
from ..lit.base import model_from_checkpoint, read_lightning_checkpoint
from ._common import (
    ConfigError,
    build_datamodule,
    build_task,
    build_trainer,
    check_expert_parallel,
    check_missing,
    check_splits,
    check_trainer,
    run_cli,
    seed_everything,
    setup_phase,
)
from ._help import check_plugins
from ._run_folder import free_name

__all__ = ["main", "train"]


def _metric(metrics: dict[str, Any], name: str | None) -> float | None:
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}")
    return float(metrics[name])


#: ``ckpt_path=`` values that Lightning resolves itself (no file to check here).
_LIGHTNING_CKPT_PATHS = (None, "last", "best", "hpc", "registry")


def _checkpoint_dir(cfg: DictConfig) -> Path:
    """Where this run's ``ModelCheckpoint`` writes (``callbacks.model_checkpoint.dirpath``, else
    ``<output_dir>/checkpoints``)."""
    node = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    return Path(str(node.get("dirpath") or Path(cfg.paths.output_dir) / "checkpoints"))


def newest_last_checkpoint(folder: Path) -> Path | None:
    """The newest ``last.ckpt`` / ``last-v<N>.ckpt`` in ``folder`` (``None`` when there is none).

    ``ModelCheckpoint`` names its last checkpoint ``last-v1.ckpt``, ``last-v2.ckpt``, ... when ``last.ckpt`` is
    taken (a second run in the same folder), and a resumed run keeps writing the name it resumed from, so the newest
    file is the one written last (modification time; the higher version on a tie), not the highest version.
    """
    found = []
    for path in folder.glob("last*.ckpt"):
        match = re.fullmatch(r"last(?:-v(\d+))?\.ckpt", path.name)
        if match and path.is_file():
            found.append((path.stat().st_mtime_ns, int(match.group(1) or 0), path))
    return max(found)[2] if found else None


def _resolve_ckpt_path(cfg: DictConfig) -> str | None:
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path == "last":  # resolved here, so the file is checked before training and a miss is an error
        folder = _checkpoint_dir(cfg)
        last = newest_last_checkpoint(folder)
        if last is None:
            raise ConfigError(
                f"ckpt_path=last: no last checkpoint in {folder}; ckpt_path=last resumes the run of "
                "hydra.run.dir=<its folder>, or give ckpt_path=<checkpoint file>"
            )
        print(f"mome-train: ckpt_path=last resumes from {last}")
        return str(last)
    if ckpt_path in _LIGHTNING_CKPT_PATHS:
        return ckpt_path
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return str(ckpt_path)


def _check_resume_checkpoint(path: str, task: nn.Module) -> None:
    """Fail before training when ``ckpt_path=`` cannot resume ``task``: a file that is not a readable Lightning
    checkpoint (truncated, damaged, a pickle that would run code) or whose weights are another model's.

    The file is memory-mapped, so only its pickled index is read here; Lightning loads it when ``fit`` starts.
    """
    checkpoint = read_lightning_checkpoint(path, mmap=True)
    check_state_fits(task, dict(checkpoint["state_dict"]), f"ckpt_path={path}")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run one training job from a composed config; returns ``(metrics, objects)``."""
    with setup_phase():
        check_missing(cfg)
        seed_everything(cfg)
        check_trainer(cfg)
        for key in ("train", "test"):  # a string ("abc") would be truthy
            if not isinstance(cfg.get(key, True), bool):
                raise ConfigError(f"{key} must be true or false, got {cfg.get(key)!r}")
        ckpt_path = _resolve_ckpt_path(cfg)
        export, push_repo, private = _export_options(cfg)
        task = build_task(cfg)
        if ckpt_path not in _LIGHTNING_CKPT_PATHS:
            _check_resume_checkpoint(ckpt_path, task)
        datamodule = build_datamodule(cfg, task)
        no_val = check_splits(cfg, datamodule)
        task.check_datamodule(datamodule)
        trainer = build_trainer(cfg)
        check_expert_parallel(trainer, task)
        if no_val:  # Lightning would ask the data module for the missing loader: validation is off instead
            print(f"mome-train: no validation ({no_val})")
            trainer.limit_val_batches = 0  # after the Trainer is built: trainer.fast_dev_run sets it too
    objects = {"cfg": cfg, "task": task, "datamodule": datamodule, "trainer": trainer}

    if cfg.get("train", True):
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best:  # the checkpoint's state_dict holds the average of weight averaging (callbacks=[default,ema]), whose
            # callback would load the raw weights over it at test: test (and export) the averaged weights
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, WeightAveraging)]
        trainer.test(task, datamodule=datamodule, ckpt_path=best or None)
        if best:  # the exported model is the one tested
            objects["best_checkpoint"] = best
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    if export and trainer.is_global_zero and not trainer.fast_dev_run:
        model = _exportable_model(task, objects)
        output = free_name(Path(cfg.paths.output_dir) / "model")  # a resumed finished run exports beside, as model-v1
        objects["export_dir"] = save_pretrained(model, output, repo_id=push_repo)  # its card names the repo
        if push_repo:
            objects["pushed_to"] = _push(model, push_repo, private, output)
    elif push_repo and trainer.fast_dev_run:
        warnings.warn("export.push_to_hub: nothing pushed, trainer.fast_dev_run exports no model", stacklevel=2)
    if trainer.is_global_zero:
        print(_summary(cfg, metrics, objects))
    return metrics, objects


def _export_options(cfg: DictConfig) -> tuple[bool, str | None, bool | None]:
    """``(enabled, push_to_hub, private)`` of the ``export`` node; ``export=false`` (a bool) still means
    ``export.enabled=false``.

    ``push_to_hub`` is checked here, before training: it must be a Hub repo id (``name`` or ``org/name``), it
    uploads the exported folder (so it needs the export) and ``private`` is a bool or null.
    """
    node = cfg.get("export", True)
    if isinstance(node, bool):
        return node, None, None
    enabled, repo_id, private = node.get("enabled", True), node.get("push_to_hub"), node.get("private")
    if not isinstance(enabled, bool):
        raise ConfigError(f"export.enabled must be true or false, got {enabled!r}")
    if repo_id is not None:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(repo_id)  # a number (export.push_to_hub=123) is refused too
        except HFValidationError as err:
            raise ConfigError(f"export.push_to_hub={repo_id!r} is not a Hub repo id (org/name): {err}") from err
        if not enabled:
            raise ConfigError(f"export.push_to_hub={repo_id} uploads the exported model: set export.enabled=true")
    if private is not None and not isinstance(private, bool):
        raise ConfigError(f"export.private={private!r}: true, false or null (the Hub's default)")
    return bool(enabled), repo_id, private


def _push(model: nn.Module, repo_id: str, private: bool | None, folder: Path) -> str:
    """Upload the exported model to ``repo_id`` with :func:`mome.push_to_hub`, which writes the exported folder's
    files again (the same weights, config and card); returns the commit URL. A failed push names the folder."""
    try:
        return push_to_hub(model, repo_id, private=private)
    except Exception as err:
        err.add_note(
            f"mome-train: the model is exported to {folder}; push it again with "
            f"mome.push_to_hub(mome.create_model('local-dir:{folder}'), {repo_id!r})"
        )
        raise


def _exportable_model(task: Any, objects: dict[str, Any]) -> Any:
    """The model to export: the task's own, or the tested checkpoint's, rebuilt whole on this process, where the
    task's is not the tested one: FSDP2 sharded it in place (``trainer=fsdp_ep``; its parameters are shards on
    each rank), or the run was in spawned processes (``trainer=ddp_spawn``/``ddp_ep``: only ``fit`` hands its
    final weights back to this process, not ``test``'s loading of the best checkpoint)."""
    spawned = isinstance(getattr(objects["trainer"].strategy, "launcher", None), _MultiProcessingLauncher)
    if not isinstance(task.model, FSDPModule) and not (spawned and "best_checkpoint" in objects):
        return task.model
    if "best_checkpoint" not in objects:
        raise ConfigError(
            "export: the model is sharded by FSDP2 (trainer=fsdp_ep) and is exported from the tested checkpoint, "
            "but there is none: keep the checkpoint callback and test=true, or set export.enabled=false"
        )
    return model_from_checkpoint(objects["best_checkpoint"])


def _summary(cfg: DictConfig, metrics: dict[str, float], objects: dict[str, Any]) -> str:
    shown = {k: v for k, v in metrics.items() if k.startswith("test/") and "/aux/" not in k}
    parts = [f"mome-train: {cfg.model.model_name} on {type(objects['datamodule']).__name__}"]
    parts += [f"{k} {v:.4f}" for k, v in sorted(shown.items())]
    if "export_dir" in objects:
        parts.append(f"model saved to {objects['export_dir']}")
    if "pushed_to" in objects:
        parts.append(f"pushed to {objects['pushed_to']}")
    return "; ".join(parts)


def _job(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    with setup_phase():
        return _metric(metrics, cfg.get("optimized_metric"))


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return run_cli("mome-train", _job, cfg)


def main() -> float | None:
    """The ``mome-train`` console script (see the module docstring); returns ``optimized_metric`` for sweepers."""
    check_plugins("mome-train", sys.argv[1:])  # before Hydra composes the config a missing plugin cannot load
    return _hydra_main()


if __name__ == "__main__":
    main()
