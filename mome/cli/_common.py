"""What ``mome-train`` and ``mome-eval`` share: building the task, data, callbacks, loggers and trainer
from a composed Hydra config, and failing with one clear line before anything is trained."""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from numbers import Real
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from .. import model_entrypoint
from .._checks import check_int
from .._errors import (
    CheckpointMismatchError,
    InvalidArgumentError,
    MomeError,
    PretrainedUnavailableError,
    UnknownModelError,
)
from ..data.base import DataConfigError, MomeDataModule
from ..layers.moe import MoE
from ..layers.soft_moe import SoftMoE
from ..lit.base import MomeTask, NonFiniteLossError, TaskConfigError
from ..lit.expert_parallel import ExpertParallelDDPStrategy, ExpertParallelFSDPStrategy
from . import _run_folder

__all__ = [
    "ConfigError",
    "SetupError",
    "build_datamodule",
    "build_task",
    "build_trainer",
    "check_missing",
    "check_moe",
    "check_splits",
    "check_trainer",
    "model_family",
    "run_cli",
    "setup_phase",
]

# Errors that mean "the configuration or the input is wrong": reported as one line, exit code 2. Every
# mome.MomeError is one (whatever its builtin base: PretrainedUnavailableError is a RuntimeError).
USER_ERRORS = (
    MomeError,
    ValueError,
    KeyError,
    FileNotFoundError,
    UnknownModelError,
    CheckpointMismatchError,
    PretrainedUnavailableError,
    DataConfigError,
    TaskConfigError,
)


class ConfigError(MomeError, ValueError):
    """A composed config that cannot run; the message names the config field."""


class SetupError(MomeError, RuntimeError):
    """Raised by :func:`setup_phase` for a configuration or input error found before training starts."""


@contextmanager
def setup_phase() -> Iterator[None]:
    """Turn configuration and input errors raised while building the run into :class:`SetupError`.

    Only this phase is reported as one line: an error during training keeps its full traceback.
    """
    try:
        yield
    except SetupError:
        raise
    except USER_ERRORS as err:
        raise SetupError(one_line(err)) from err


def one_line(err: BaseException, where: str = "", message: str | None = None) -> str:
    """``<ErrorType>: <where><the message's first line>``: how :func:`setup_phase` reports ``err`` (``message``:
    in place of ``str(err)``)."""
    text = (str(err) if message is None else message).strip()
    return f"{type(err).__name__}: {where}{text.splitlines()[0] if text else ''}"


def plain_container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def model_family(model_name: str) -> str:
    """The family of a registry model name (``arch`` or ``arch.tag``): the last part of the module that
    registers its entrypoint, e.g. ``vmoe``, ``soft_moe_vit``, ``limoe``, ``vlmo``, ``moe_llava``."""
    return model_entrypoint(model_name).__module__.rpartition(".")[2]


def _choice(group: str) -> str:
    """``<group>=<selected option>`` for messages (the group's name alone outside a Hydra run)."""
    choice = HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None
    return f"{group}={choice}" if choice else group


def seed_everything(cfg: DictConfig) -> None:
    """Seed Python, NumPy and torch (and the data workers) with ``cfg.seed`` through Lightning; ``seed=null`` leaves
    them unseeded. A seed that is not a whole number fails in one line naming ``seed``."""
    seed = cfg.get("seed")
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be a whole number (or null), got {seed!r}")
    if not 0 <= seed < 2**32:  # Lightning would replace it by a random seed, with a warning only
        raise ConfigError(f"seed must be a whole number in [0, {2**32 - 1}] (or null), got {seed!r}")
    L.seed_everything(seed, workers=True)


def check_missing(cfg: DictConfig) -> None:
    """Fail before anything is built when the config leaves a value the user must give (``???``).

    A template for real data (``experiment=limoe_csv``, ``vmoe_imagefolder``, ...) marks the paths and sizes
    only the user knows as mandatory (``data.train_file: ???``, ``model.num_classes: ???``, or, for a key its
    group sets to null, ``required: [task.init_from]``); the error lists every one of them in one line, as the
    overrides to add.
    """
    missing = {key for key in OmegaConf.missing_keys(cfg) if not str(key).startswith("hydra.")}
    # a "???" of an experiment does not replace a group's default (OmegaConf keeps the value it merges onto): such a
    # key is listed in the experiment's `required` instead
    missing.update(str(key) for key in cfg.get("required") or () if OmegaConf.select(cfg, str(key)) is None)
    missing = sorted(missing)
    if missing:
        experiment = _choice("experiment")
        needs = " ".join(f"{key}=<value>" for key in missing)
        raise ConfigError(f"{experiment} needs a value for {', '.join(missing)}: add {needs} to the command")


def _monitored(cfg: DictConfig) -> list[tuple[str, str]]:
    """``(callbacks.<key>.monitor, metric)`` of every configured callback that monitors a metric."""
    found = []
    for key, node in (cfg.get("callbacks") or {}).items():
        if isinstance(node, DictConfig) and node.get("monitor"):
            found.append((f"callbacks.{key}.monitor", str(node.monitor)))
    return found


def check_splits(cfg: DictConfig, datamodule: MomeDataModule) -> str | None:
    """Fail before training when a split the run will read is not configured: the test split with ``test=true``
    (``trainer.test`` runs after training), the validation split when a callback monitors a ``val/`` metric
    (``ModelCheckpoint`` would fail at the end of the first epoch).

    Returns why there is no validation split (the data module's message), or ``None`` when there is one.
    """
    no_val = None
    if cfg.get("train", True):
        try:
            datamodule.val_dataloader()
        except DataConfigError as err:
            no_val = str(err)
        for field, metric in _monitored(cfg):
            if no_val and metric.startswith("val/"):
                raise ConfigError(f"{field}={metric} needs a validation split: {no_val} (or set {field}=null)")
    if cfg.get("test", True):
        try:
            datamodule.test_dataloader()
        except DataConfigError as err:
            raise ConfigError(f"test=true tests the trained model: {err} (or set test=false)") from err
    return no_val


def check_moe(cfg: DictConfig) -> None:
    """Fail before anything is built when the selected ``moe`` recipe does not fit the model.

    A recipe of ``conf/moe`` (``@package _global_``) is merged by Hydra into ``cfg.model``, the model spec,
    and lists in ``moe.applies_to`` the model families (:func:`model_family`) whose entrypoints take its
    fields. The model must be a registry name of one of them: a saved model (``local-dir:``, ``hf-hub:``)
    keeps the layers it was saved with, and without ``model=`` (``mome-eval ckpt_path=`` alone) the
    checkpoint's recorded spec is built, so in both cases the recipe would be ignored.
    """
    moe = cfg.get("moe")
    if moe is None:
        return
    selected = _choice("moe")
    families = list(moe.get("applies_to") or [])
    if not families:
        raise ConfigError(f"moe.applies_to: {selected} names no model family it applies to")
    name = cfg.model.get("model_name") if cfg.get("model") is not None else None
    if not name:
        raise ConfigError(f"moe.applies_to: {selected} changes the MoE layers of model=<name>; no model is selected")
    if ":" in str(name):
        raise ConfigError(
            f"moe.applies_to: {selected} changes the MoE layers, but model.model_name={name} is a saved model "
            "whose layers are fixed; select its architecture (model=<arch>) instead"
        )
    family = model_family(str(name))
    if family not in families:
        raise ConfigError(
            f"moe.applies_to: {selected} applies to {', '.join(families)} models, not to {name} (a {family} model)"
        )


def build_task(cfg: DictConfig) -> MomeTask:
    """The task's LightningModule: ``cfg.task`` (its ``_target_`` class and kwargs) given ``cfg.model``, the
    model spec (``conf/model``, with a ``conf/moe`` recipe merged in; the task builds the model from it)."""
    if cfg.get("task") is None or "_target_" not in cfg.task:
        raise ConfigError("task: no task selected (task=contrastive|classification|vlmo|llava)")
    if cfg.get("model") is None:
        raise ConfigError("model: no model selected (model=<name>, see mome.list_models())")
    check_moe(cfg)
    kwargs = plain_container(cfg.task)
    task_class = get_class(kwargs.pop("_target_"))
    try:
        return task_class(model=plain_container(cfg.model), **kwargs)
    except TypeError as err:
        raise ConfigError(f"task ({task_class.__name__}): {err}") from err
    except USER_ERRORS as err:  # the error's own type is kept in the line; its constructor may take other arguments
        where = "" if str(err).startswith("task") else f"model ({cfg.model.get('model_name')}): "
        raise SetupError(one_line(err, where)) from err


def build_datamodule(cfg: DictConfig, task: MomeTask) -> MomeDataModule:
    """Instantiate ``cfg.data``, bind the model's preprocessing and tokenizer, and set it up eagerly so
    that missing files fail now, not after the trainer started."""
    if cfg.get("data") is None:
        raise ConfigError("data: no data module selected (data=digits|imagefolder|csv|webdataset|...)")
    try:
        datamodule = instantiate(cfg.data)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise (cause if isinstance(cause, USER_ERRORS) else ConfigError(f"data: {cause}")) from err
    bind_data = getattr(task, "bind_data", None)  # an evaluation task may bind its own way (raw VQA records)
    if bind_data is not None:
        bind_data(datamodule)
    else:
        datamodule.bind(task.model, task.tokenizer)
    datamodule.setup("fit")
    return datamodule


def _instantiate_group(group: DictConfig | None, name: str) -> list[Any]:
    objects = []
    for key, node in (group or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            try:
                objects.append(instantiate(node))
            except InstantiationException as err:
                raise ConfigError(f"{name}.{key}: {err.__cause__ or err}") from err
    return objects


#: ``Trainer`` arguments that are whole numbers: ``(the smallest value, whether null is accepted)``.
_TRAINER_INTS = {
    "max_epochs": (-1, True),
    "min_epochs": (0, True),
    "max_steps": (-1, False),
    "min_steps": (0, True),
    "num_nodes": (1, False),
    "accumulate_grad_batches": (1, False),
    "check_val_every_n_epoch": (1, True),
    "log_every_n_steps": (1, True),
    "num_sanity_val_steps": (-1, True),
}
#: ``Trainer`` arguments that are a number of batches (an int) or a fraction of the epoch (a float in ``[0, 1]``).
_TRAINER_BATCHES = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


def check_trainer(cfg: DictConfig) -> None:
    """Fail before anything is built when a numeric ``trainer.<key>`` is not a number Lightning takes
    (``trainer.max_epochs=abc`` would only fail, or be ignored, once ``fit`` runs): one line naming the key."""
    node = plain_container(cfg.get("trainer")) or {}
    for key, (minimum, optional) in _TRAINER_INTS.items():
        if key in node:
            check_int(f"trainer.{key}", node[key], minimum=minimum, optional=optional)
    for key in (*_TRAINER_BATCHES, "overfit_batches", "val_check_interval"):
        value = node.get(key)
        if value is None:
            continue
        low = 1 if key == "val_check_interval" else 0
        fraction = isinstance(value, float) and 0.0 <= value <= 1.0 and (value > 0 or low == 0)
        count = isinstance(value, int) and not isinstance(value, bool) and value >= low
        if not (fraction or count):
            share = "(0, 1]" if low else "[0, 1]"
            raise InvalidArgumentError(
                f"trainer.{key}", f"a number of batches >= {low} or a fraction of the epoch in {share}", value
            )
    fast = node.get("fast_dev_run", False)
    if not isinstance(fast, bool) and not (isinstance(fast, int) and fast >= 0):
        raise InvalidArgumentError("trainer.fast_dev_run", "true, false or a number of batches >= 0", fast)
    clip = node.get("gradient_clip_val")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, Real) or not 0 <= clip < math.inf):
        raise InvalidArgumentError("trainer.gradient_clip_val", "a finite number >= 0 (or null)", clip)


#: Keys of the ``trainer`` group that are mome's, not ``Trainer`` arguments: the strategy reads them through
#: interpolation (``trainer.expert_parallel_size`` -> ``trainer.strategy.expert_parallel_size``).
_MOME_TRAINER_KEYS = ("expert_parallel_size",)


def build_trainer(cfg: DictConfig) -> L.Trainer:
    callbacks = _instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = _instantiate_group(cfg.get("logger"), "logger")
    try:
        trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
        for key in _MOME_TRAINER_KEYS:
            trainer_cfg.pop(key, None)
        return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    except InstantiationException as err:
        raise ConfigError(f"trainer: {err.__cause__ or err}") from err


def check_expert_parallel(trainer: L.Trainer, task: MomeTask) -> None:
    """An expert-parallel trainer (``trainer=ddp_ep|fsdp_ep``) shards the experts of the model's MoE layers;
    a model without one (e.g. MoE-LLaVA's dense stages I and II) is refused in one line before any process
    starts."""
    if not isinstance(trainer.strategy, (ExpertParallelDDPStrategy, ExpertParallelFSDPStrategy)):
        return
    if not any(isinstance(module, (MoE, SoftMoE)) for module in task.model.modules()):
        raise ConfigError(
            f"trainer: {type(trainer.strategy).__name__} shards the experts of MoE layers, and "
            f"{type(task.model).__name__} has none (moe_layers): use trainer=ddp_spawn or trainer=ddp"
        )


def _remove_unfinished_output(prog: str) -> None:
    """Remove this run's output folder if this run created it and it holds no checkpoint (nothing worth keeping
    was written); a folder that existed before the run (a resumed run's) is left alone."""
    if not HydraConfig.initialized():
        return
    output = Path(HydraConfig.get().runtime.output_dir)
    if output.absolute() in _run_folder.EARLIER:
        return
    if output.is_dir() and not any(output.rglob("*.ckpt")):
        shutil.rmtree(output, ignore_errors=True)
        print(f"{prog}: removed the unfinished output folder {output}", file=sys.stderr)


def run_cli(prog: str, job: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``job(cfg)``: a setup error prints one line naming the field, removes the run's folder and
    exits 2; a non-finite loss prints the step and the loss terms and exits 1; a bad sample or record met while
    running (:class:`~mome.data.DataConfigError`: the file and its line or record) prints one line, keeps what the
    run wrote and exits 1."""
    try:
        return job(cfg)
    except NonFiniteLossError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from err
    except SetupError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        _remove_unfinished_output(prog)
        raise SystemExit(2) from err
    except DataConfigError as err:  # a bad sample or record met while running: what was written is kept
        kept = f" (the run's outputs so far are kept in {_output_dir()})" if HydraConfig.initialized() else ""
        print(f"{prog}: error: {one_line(err, message=_worker_message(err))}{kept}", file=sys.stderr)
        raise SystemExit(1) from err


def _output_dir() -> str:
    return str(HydraConfig.get().runtime.output_dir)


def _worker_message(err: BaseException) -> str:
    """The message of ``err`` as raised: a DataLoader worker's error is raised again in the main process with the
    worker's traceback as its message, whose last entry is ``<module>.<Type>: <message>``."""
    text, marker = str(err), f"{type(err).__module__}.{type(err).__qualname__}: "
    return text.rsplit(marker, 1)[1] if "Original Traceback" in text and marker in text else text
