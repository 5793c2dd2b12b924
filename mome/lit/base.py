"""The LightningModule base of every mome training task.

A task receives the *model spec* (the composed ``model`` node: ``model_name`` plus the
``mome.create_model`` kwargs, see :func:`build_model`) and builds the model itself, so
``save_hyperparameters`` stays small and a checkpoint reloads with ``Task.load_from_checkpoint(path)`` and no
other argument (the lightning-hydra-template's #456 trade-off, decided for names-and-kwargs).

Every training step optimises ``L = L_task + aux_loss_weight * sum_l sum_name aux_l[name]`` where
``aux_l`` are the weighted auxiliary losses of MoE layer ``l`` (``mome.aux_losses``); each term is logged
on its own (``train/task_loss``, ``train/aux/<name>``). A loss that is NaN or infinite stops the run with
a :class:`NonFiniteLossError` naming the global step and every term.

Optimisation is configured by plain dicts (no pickled partials in the checkpoint):

- ``optimizer``: ``{"name": "adamw", "lr": ..., "weight_decay": ..., **timm kwargs}`` built with timm's
  ``create_optimizer_v2`` (parameter groups without weight decay for biases, norms, every parameter of
  ``ndim <= 1`` such as router temperatures and Soft MoE scales, and ``model.no_weight_decay()``);
- ``scheduler``: ``{"name": "cosine", "warmup_steps": int | "warmup_fraction": float, "min_lr_ratio"}``,
  stepped every optimisation step: linear warm-up ``lr * s / W`` then
  ``lr * (r + (1 - r) * (1 + cos(pi * (s - W) / (S - W))) / 2)`` over the ``S`` training steps.
"""

from __future__ import annotations

import fnmatch
import math
import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from numbers import Real
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from .._checkpoint import load_state_exactly, read_torch_file
from .._checks import check_finite_positive, check_int
from .._errors import CheckpointMismatchError, CorruptCheckpointError, InvalidArgumentError, MomeError
from .._factory import create_model
from ..layers.moe import aux_losses, eval_capacity, update_expert_biases

__all__ = [
    "MomeTask",
    "NonFiniteLossError",
    "TaskConfigError",
    "EvalCapacity",
    "build_model",
    "model_from_checkpoint",
    "read_lightning_checkpoint",
    "set_trainable",
]


class TaskConfigError(MomeError, ValueError):
    """A task's configuration cannot work (unknown optimiser/scheduler, a pattern that matches nothing)."""


class NonFiniteLossError(MomeError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the terms."""


#: The ``_target_`` of a model spec: ``conf/model`` files and ``model=<name>`` nodes are Hydra-instantiable.
MODEL_TARGET = "mome.create_model"


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """``mome.create_model(**spec)`` from a model spec: ``model_name`` plus ``create_model`` kwargs.

    A spec (the composed ``model`` node of ``mome-train``/``mome-eval``, a checkpoint's
    ``hyper_parameters.model``) may carry ``_target_: mome.create_model``, which makes the same node a
    Hydra config: ``hydra.utils.instantiate(spec)`` builds the same model. Any other ``_target_`` is an
    error, not ignored: this function builds with ``create_model`` only.
    """
    kwargs = dict(spec)
    target = kwargs.pop("_target_", MODEL_TARGET)
    if target != MODEL_TARGET:
        raise TaskConfigError(f"model._target_={target}: a model spec is built by {MODEL_TARGET} (or has no _target_)")
    if "model_name" not in kwargs:
        raise TaskConfigError(f"the model config needs a model_name field (got fields {sorted(kwargs)})")
    return create_model(**kwargs)


def read_lightning_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint read with ``torch.load(weights_only=True)`` (``mmap=True``: tensors memory-mapped,
    only the pickled index read now), checked to hold a ``state_dict``.

    ``mome-train`` (``ckpt_path=``) and ``mome-eval`` read checkpoints here, so one file gets one error from both.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: a pickle that ``weights_only=True`` refuses for the globals it would import (it would
            run code); nothing in it runs.
        CheckpointFormatError: another format (safetensors, msgpack) or bytes of no known format (text, random bytes).
        CorruptCheckpointError: a truncated or damaged file, or one without a ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    checkpoint = read_torch_file(path, mmap=mmap, what="Lightning checkpoint")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CorruptCheckpointError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return checkpoint


def model_from_checkpoint(path: str | Path) -> nn.Module:
    """The model inside a ``mome-train`` Lightning checkpoint, rebuilt from its recorded spec and loaded
    strictly (the task's own parameters, e.g. VLMo's MIM head, are left out).

    Raises:
        FileNotFoundError, UnsafeCheckpointError, CorruptCheckpointError: see :func:`read_lightning_checkpoint`.
        CheckpointMismatchError: not a mome task checkpoint, or its weights do not fit the model it names.
    """
    checkpoint = read_lightning_checkpoint(path)
    spec = checkpoint.get("hyper_parameters", {}).get("model")
    if not isinstance(spec, Mapping):
        raise CheckpointMismatchError(f"{path}: not a mome-train checkpoint (no hyper_parameters.model spec)")
    model = build_model(spec)
    add_adapters(model, checkpoint.get("hyper_parameters", {}).get("peft"))
    prefix = "model."
    state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    load_state_exactly(model, state, str(path))
    return model


def add_adapters(model: nn.Module, peft: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Add the LoRA experts of a task's ``peft`` node (:func:`mome.peft.add_lora_experts`) to ``model``; returns the
    node as a dict, or None without one. A bad node is a :class:`TaskConfigError` naming ``task.peft``."""
    if peft is None:
        return None
    from ..peft import LoRAExpertsConfig, add_lora_experts

    if not isinstance(peft, Mapping):
        raise TaskConfigError(f"task.peft must be a mapping of LoRAExpertsConfig fields, got {peft!r}")
    try:
        config = LoRAExpertsConfig(**peft)
    except TypeError as err:
        raise TaskConfigError(f"task.peft: {err}") from err
    add_lora_experts(model, config)
    return dict(peft)


class EvalCapacity:
    """The capacity of the MoE layers while a task validates or tests (``eval_capacity`` of the tasks).

    ``"dropless"`` (the default of ``mome-train``'s validation and test and of ``mome-eval``): no token-choice
    layer drops a token, so every output is a function of the model and its sample, not of the batch it
    shares (:func:`mome.layers.eval_capacity`); ``"model"``: the layers' own ``eval_capacity_factor`` (a
    family's documented eval capacity, e.g. the value a V-MoE card sets as upstream does); a number ``c > 0``:
    that capacity factor in every layer.
    """

    def __init__(self, value: str | float | None = "dropless") -> None:
        if value is None or value == "dropless":
            self.value: str | float = "dropless"
        elif value == "model":
            self.value = "model"
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            self.value = float(value)
        else:
            raise TaskConfigError(f"eval_capacity must be 'dropless', 'model' or a capacity factor > 0, got {value!r}")
        self._stack: ExitStack | None = None

    def enter(self, model: nn.Module) -> None:
        """Apply to ``model`` until :meth:`exit` (nothing for ``"model"``)."""
        self.exit()
        self._stack = ExitStack()
        if self.value != "model":
            self._stack.enter_context(eval_capacity(model, None if self.value == "dropless" else self.value))

    def exit(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None


def set_trainable(model: nn.Module, trainable: Sequence[str] | None, frozen: Sequence[str] = ()) -> list[str]:
    """Freeze parameters by name pattern (``fnmatch``); return the names left trainable.

    ``trainable=None`` keeps every parameter trainable except those matching ``frozen``; a list keeps
    only the names matching one of its patterns. A pattern that matches no parameter is an error (a
    typo would otherwise train, or freeze, the wrong thing in silence).
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in [*(trainable or []), *frozen]:
        if not fnmatch.filter(names, pattern):
            raise TaskConfigError(f"parameter pattern {pattern!r} matches no parameter of {type(model).__name__}")
    kept = []
    for name, param in model.named_parameters():
        wanted = trainable is None or any(fnmatch.fnmatchcase(name, p) for p in trainable)
        param.requires_grad_(wanted and not any(fnmatch.fnmatchcase(name, p) for p in frozen))
        if param.requires_grad:
            kept.append(name)
    if not kept:
        raise TaskConfigError("the trainable/frozen patterns leave no parameter to train")
    return kept


def check_number(name: str, value: object, expected: str, *, upper: float = 1.0) -> None:
    """``value`` is a real number in ``[0, upper]`` (``upper=math.inf``: any finite number ``>= 0``)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= upper or not math.isfinite(value):
        raise InvalidArgumentError(name, expected, value)


def _check_schedule(optimizer: Mapping[str, Any], scheduler: Mapping[str, Any]) -> None:
    """The numbers of ``task.optimizer`` and ``task.scheduler`` that the optimiser and the schedule would take
    without complaint and train wrongly with (an infinite or zero learning rate) or fail on only when ``fit`` starts
    (a NaN learning rate, a warm-up that is not a whole number of steps)."""
    if optimizer.get("lr") is not None:
        check_finite_positive("task.optimizer.lr", optimizer["lr"])
    if optimizer.get("weight_decay") is not None:
        check_number("task.optimizer.weight_decay", optimizer["weight_decay"], "a finite number >= 0", upper=math.inf)
    if "warmup_steps" in scheduler:
        check_int("task.scheduler.warmup_steps", scheduler["warmup_steps"], minimum=0)
    if "warmup_fraction" in scheduler:
        check_number("task.scheduler.warmup_fraction", scheduler["warmup_fraction"], "a number in [0, 1]")
    if "min_lr_ratio" in scheduler:
        check_number("task.scheduler.min_lr_ratio", scheduler["min_lr_ratio"], "a number in [0, 1]")


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The learning-rate multiplier of linear warm-up then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class MomeTask(L.LightningModule):
    """Builds the model from its spec; optimiser, schedule, aux losses, freezing, finiteness checks.

    Args:
        model: the model spec (``model_name`` and ``mome.create_model`` kwargs).
        optimizer: ``{"name", "lr", "weight_decay", ...}`` for timm's ``create_optimizer_v2``.
        scheduler: ``{"name": "cosine" | "constant", "warmup_steps" | "warmup_fraction", "min_lr_ratio"}``.
        aux_loss_weight: scale of the MoE auxiliary losses added to the task loss.
        trainable / frozen: parameter-name patterns (see :func:`set_trainable`).
        grad_checkpointing: call the model's ``set_grad_checkpointing(True)`` (timm's switch).
        check_finite: stop on a NaN/inf loss (one host sync per step).
        eval_capacity: the MoE capacity at validation and test: ``"dropless"`` (default), ``"model"`` (the
            layers' own eval capacity) or a capacity factor (:class:`EvalCapacity`).
        peft: LoRA experts to tune instead of the model (:class:`mome.peft.LoRAExpertsConfig` fields, e.g.
            ``{"target_modules": ["qkv", "fc1"], "r": 8, "num_experts": 4, "routing": "token"}``): they are added to
            the model as it is built, and they (experts and routers) are the only parameters trained: the base
            model stays frozen whatever the task's stages or ``trainable`` say (:meth:`restrict_to_adapters`).
        compile: ``torch.compile`` the model when the trainer sets the task up (``configure_model``), in place
            (``nn.Module.compile``: parameter names, checkpoints and exports stay those of the eager model);
            ``True`` for torch's defaults (inductor), or a mapping of ``torch.compile`` keyword arguments
            (``{"backend": "aot_eager"}``, ``{"mode": "max-autotune"}``, ...). False (default): eager.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        aux_loss_weight: float = 1.0,
        trainable: Sequence[str] | None = None,
        frozen: Sequence[str] = (),
        grad_checkpointing: bool = False,
        check_finite: bool = True,
        eval_capacity: str | float | None = "dropless",
        compile: bool | Mapping[str, Any] = False,
        peft: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(model)
        self.peft_cfg = add_adapters(self.model, peft)
        self.model_spec = dict(model)
        self.optimizer_cfg = dict(optimizer or {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05})
        self.scheduler_cfg = dict(scheduler or {"name": "cosine", "warmup_fraction": 0.05, "min_lr_ratio": 0.0})
        if self.scheduler_cfg.get("name", "cosine") not in ("cosine", "constant"):
            raise TaskConfigError(f"task.scheduler.name must be 'cosine' or 'constant', got {self.scheduler_cfg}")
        check_number("task.aux_loss_weight", aux_loss_weight, "a finite number >= 0", upper=math.inf)
        for name, flag in (("task.grad_checkpointing", grad_checkpointing), ("task.check_finite", check_finite)):
            if not isinstance(flag, bool):
                raise InvalidArgumentError(name, "true or false", flag)
        _check_schedule(self.optimizer_cfg, self.scheduler_cfg)
        self.aux_loss_weight = aux_loss_weight
        self.check_finite = check_finite
        if trainable is not None or frozen:
            set_trainable(self.model, list(trainable) if trainable is not None else None, list(frozen))
        self.restrict_to_adapters()
        if grad_checkpointing:
            if not hasattr(self.model, "set_grad_checkpointing"):
                raise TaskConfigError(f"{type(self.model).__name__} has no set_grad_checkpointing switch")
            self.model.set_grad_checkpointing(True)
        self._tokenizer = None
        self.eval_capacity = EvalCapacity(eval_capacity)
        if not isinstance(compile, (bool, Mapping)):
            raise TaskConfigError(f"task.compile must be true, false or torch.compile kwargs, got {compile!r}")
        self.compile_kwargs: dict[str, Any] | None = (
            dict(compile) if isinstance(compile, Mapping) else ({} if compile else None)
        )
        self._create_optimizer()  # an optimizer name or argument timm refuses fails now, not when fit starts

    def restrict_to_adapters(self) -> None:
        """With ``peft``: freeze every parameter of the model but the LoRA experts and their routers (a task calls
        this again after its own stage or schedule changed what trains); nothing without ``peft``."""
        if self.peft_cfg is not None:
            from ..peft import mark_only_adapters_trainable

            mark_only_adapters_trainable(self.model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward (what the model summary runs on :attr:`example_input_array`)."""
        return self.model(*args, **kwargs)

    @property
    def example_input_array(self) -> Any:
        """One example sample of the model's input (:func:`mome._flops.example_input`, batch size 1), so Lightning's
        model summary reports the FLOPs of one sample ("Total FLOPs") and each layer's sizes."""
        if self._example_input_array is None:
            from .._flops import example_input

            self._example_input_array = example_input(self.model)
        return self._example_input_array

    @example_input_array.setter
    def example_input_array(self, example: Any) -> None:
        self._example_input_array = example

    def model_cost(self) -> dict[str, int]:
        """Total and active parameters and the active FLOPs of one sample (:func:`mome._flops.model_cost`)."""
        from .._flops import model_cost

        return model_cost(self.model, self.example_input_array)

    def compile_targets(self) -> list[nn.Module]:
        """The modules ``task.compile`` compiles in place: the model, whose forward the task's steps call. A task
        whose steps call other methods of the model names the modules those run (VLMo: its blocks)."""
        return [self.model]

    def configure_model(self) -> None:
        """``task.compile``: compile :meth:`compile_targets` in place, once (Lightning calls this hook at every
        fit/validate/test)."""
        if self.compile_kwargs is None:
            return
        for module in self.compile_targets():
            if getattr(module, "_compiled_call_impl", None) is None:
                module.compile(**self.compile_kwargs)

    # -------------------------------------------------------------- evaluation capacity (dropless)
    def on_validation_start(self) -> None:
        self.eval_capacity.enter(self.model)

    def on_validation_end(self) -> None:
        self.eval_capacity.exit()

    def on_test_start(self) -> None:
        self.eval_capacity.enter(self.model)

    def on_test_end(self) -> None:
        self.eval_capacity.exit()

    # ------------------------------------------------------------------------------ helpers
    @property
    def model_name(self) -> str:
        return str(self.model_spec["model_name"])

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (``mome.get_tokenizer``), or ``None`` for a model without text."""
        if self._tokenizer is None:
            cfg = getattr(self.model, "pretrained_cfg", None)
            if cfg is None or not cfg.get("tokenizer"):
                return None
            from .._tokenizer import create_tokenizer

            self._tokenizer = create_tokenizer(cfg.get("tokenizer"), context_length=cfg.get("context_length"))
        return self._tokenizer

    def total_loss(
        self, task_losses: Mapping[str, Tensor], stage: str, aux: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """Sum the task terms and the weighted MoE aux losses (``aux``, else those the model's last forward pass
        recorded, :func:`mome.aux_losses`); log every term; check finiteness."""
        aux = aux_losses(self.model) if aux is None else dict(aux)
        aux_total = sum(aux.values(), torch.zeros((), device=self.device))
        total = sum(task_losses.values()) + self.aux_loss_weight * aux_total
        batch_size = self._batch_size
        for name, value in task_losses.items():
            self.log(f"{stage}/{name}", value.detach(), batch_size=batch_size, sync_dist=stage != "train")
        for name, value in aux.items():
            self.log(f"{stage}/aux/{name}", value.detach(), batch_size=batch_size, sync_dist=stage != "train")
        self.log(f"{stage}/loss", total.detach(), prog_bar=True, batch_size=batch_size, sync_dist=stage != "train")
        if stage == "train" and self.check_finite and not torch.isfinite(total.detach()):
            terms = {**task_losses, **{f"aux/{k}": v for k, v in aux.items()}}
            listing = ", ".join(f"{k}={v.detach().float().item():.4g}" for k, v in terms.items())
            raise NonFiniteLossError(f"non-finite training loss at global step {self.global_step}: {listing}")
        return total

    _batch_size: int | None = None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: update the routers' expert biases from the loads of this
        step's training forward passes (all of its accumulated micro-batches), once per optimizer step."""
        update_expert_biases(self.model)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_size = _infer_batch_size(batch)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_size = _infer_batch_size(batch)

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_size = _infer_batch_size(batch)

    def check_datamodule(self, datamodule: Any) -> None:
        """Fail before training when ``datamodule`` cannot feed this task (a subclass checks what it needs, e.g.
        the number of classes); the base task accepts any data module."""

    # -------------------------------------------------------------------- checkpoint RNG state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the RNG states (noisy routers draw from torch's), so a resumed run continues the stream."""
        checkpoint["mome_rng_states"] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "mome_rng_states" in checkpoint and self._trainer is not None and self.trainer.state.fn == "fit":
            _set_rng_states(checkpoint["mome_rng_states"])

    # ---------------------------------------------------------------------------- optimiser
    def _create_optimizer(self) -> torch.optim.Optimizer:
        """``task.optimizer`` built by timm's ``create_optimizer_v2`` over the model's trainable parameters."""
        from timm.optim import create_optimizer_v2

        cfg = dict(self.optimizer_cfg)
        name = cfg.pop("name", "adamw")
        try:
            return create_optimizer_v2(self.model, opt=name, **cfg)
        except (TypeError, ValueError, AssertionError) as err:
            raise TaskConfigError(f"task.optimizer {self.optimizer_cfg}: {err}") from err

    def configure_optimizers(self) -> Any:
        optimizer = self._create_optimizer()
        sched = dict(self.scheduler_cfg)
        if sched.get("name", "cosine") == "constant":
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_multiplier(sched))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def lr_multiplier(self, sched: Mapping[str, Any]) -> Callable[[int], float]:
        """``task.scheduler``'s learning-rate multiplier of the optimizer step: linear warm-up over ``warmup_steps``
        (else ``warmup_fraction`` of the run's steps), then cosine decay to ``min_lr_ratio`` at the last step."""
        total = int(self.trainer.estimated_stepping_batches)
        warmup = warmup_steps(sched, total)
        ratio = float(sched.get("min_lr_ratio", 0.0))
        return lambda step: cosine_with_warmup(step, total, warmup, ratio)


def warmup_steps(sched: Mapping[str, Any], total: int) -> int:
    """The warm-up of a schedule of ``total`` steps: ``warmup_steps``, else ``warmup_fraction * total``, in
    ``[1, total]``."""
    warmup = int(sched.get("warmup_steps", round(sched.get("warmup_fraction", 0.0) * total)))
    return max(1, min(warmup, total))


def _rng_states() -> dict[str, Any]:
    """torch, Python, NumPy (and CUDA) RNG states, in types that ``torch.load(weights_only=True)`` reads."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


#: keys of one row per sample, looked at first: a conversation batch's ``images`` / ``audios`` hold one row per
#: image or clip (none at all in an audio-only or image-only batch), not per sample
SAMPLE_KEYS = ("input_ids", "labels")


def _infer_batch_size(batch: Any) -> int | None:
    """The number of samples of ``batch`` (the weight of its logged means): the rows of ``input_ids`` (or
    ``labels``) where the batch has them, else of its first tensor."""
    if isinstance(batch, Mapping):
        for key in SAMPLE_KEYS:
            value = batch.get(key)
            if isinstance(value, Tensor) and value.ndim > 0:
                return int(value.shape[0])
        for value in batch.values():
            if isinstance(value, Tensor) and value.ndim > 0:
                return int(value.shape[0])
    return None
