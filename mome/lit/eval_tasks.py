"""The image and text evaluation tasks of ``mome-eval``: LightningModules run with ``Trainer.test``.

Each task takes a built model (from the zoo, a saved folder or a ``mome-train`` checkpoint) and reports
metrics named as CLIP_benchmark names them, as fractions in ``[0, 1]`` (:mod:`mome.lit.metrics`):

- :class:`ZeroShotClassificationTask` (``zero_shot``): one classifier column per class, the mean of the
  L2-normalised text embeddings of its prompts, renormalised (open_clip's ``build_zero_shot_classifier``,
  CLIP, Radford et al. 2021, sec. 3.1.4); logits ``100 * u @ W`` for the unit image embedding ``u``;
  ``acc1``, ``acc5`` and ``mean_per_class_recall`` (torchmetrics; ``acc5`` only with more than 5 classes).
  A transformers MoE VLM (:mod:`mome.models.hf_moe_vlm`) is scored by likelihood instead: each class's templates
  as the answer to a question about the image, through the family's processor (see the class).
- :class:`RetrievalTask` (``retrieval``): image->text and text->image recall@k counted as in the CLIP
  paper (a query scores 1 when *any* of its positives is among its top k; :func:`retrieval_recall_at_k`).

A model with an audio modality (``encode_audio`` and ``"audio"`` in its ``modality_names``: LIMoE with
``audio=True``) evaluated on batches with ``"audio"`` (``data.task=image_text_audio``) is scored from its audio
too: zero-shot classification from the audio embeddings against the same text classifier (``audio_acc1``,
``audio_acc5``, ``audio_mean_per_class_recall``) and retrieval between every ordered pair of image, text and audio
(``audio_to_text_recall@k``, ``text_to_audio_recall@k``, ``audio_to_image_recall@k``, ``image_to_audio_recall@k``,
beside the image-text names above).
- :class:`LinearProbeTask` (``linear_probe``): L2-regularised logistic regression (scikit-learn L-BFGS, as
  CLIP's linear-probe protocol, sec. 3.2) fitted on frozen features of the train split, scored on the
  evaluation split: ``acc1``, ``acc5``, ``mean_per_class_recall``.
- :class:`ClassificationEvalTask` (``classification``): the model's own classifier head (V-MoE, Soft MoE):
  ``acc1``, ``acc5``, ``mean_per_class_recall`` (timm's ``validate.py`` top-1/top-5, in fractions).

The question-answering task of MoE-LLaVA models, :class:`mome.lit.VQAEvalTask`, is in :mod:`mome.lit.eval_vqa`.

A new task subclasses :class:`EvaluationTask` (``name``, ``option``, and ``evaluate_batch`` / ``compute``;
``check_data`` and ``dataloaders`` to check the data, ``protocol`` to record settings) and gets a
``conf/eval_task/<option>.yaml`` (``_target_: mome.lit.<ClassName>`` + its options, so the class is
exported by :mod:`mome.lit`); batches may hold any tensors, and lists with one entry per sample.

No sample is counted twice under DDP: the base class drops the samples the distributed sampler repeats
before the model sees them (:mod:`mome.lit.unique_samples`) and sorts gathered per-sample outputs by
dataset index, so the numbers equal a single-process run.

Results follow the CLIP_benchmark JSON schema (:data:`mome.lit.metrics.RESULT_SCHEMA`), written with the
routing report (:mod:`mome.lit.routing_report`) to the run's output folder by the task itself (rank 0),
which also works under ``ddp_spawn``.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..data.base import DataConfigError, MomeDataModule
from ..data.conversation import ConversationDataModule
from .base import EvalCapacity, MomeTask, TaskConfigError
from .classification import classification_metrics
from .metrics import clip_benchmark_names, fit_linear_probe, result_record, retrieval_recall_at_k
from .routing_report import RoutingRecorder, write_routing_report
from .unique_samples import batch_length, plan_batches, select_samples

__all__ = [
    "ClassificationEvalTask",
    "EvaluationTask",
    "LinearProbeTask",
    "RetrievalTask",
    "ZeroShotClassificationTask",
    "has_audio",
    "patch_grid",
    "processor_of",
    "split_loader",
]


# ------------------------------------------------------------------------------------------- data
def split_loader(
    datamodule: MomeDataModule,
    split: str,
    max_samples: int | None = None,
    *,
    wrap: Callable[[Dataset], Dataset] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """An ordered, unaugmented loader of ``split`` (``train``, ``val`` or ``test``) of a bound data module;
    the first ``max_samples`` samples only when given. ``wrap`` replaces the split's dataset by
    ``wrap(dataset)`` (before the subset) and ``collate_fn`` the data module's collate function.

    Raises:
        DataConfigError: the split does not exist or is empty.
    """
    if split not in ("train", "val", "test"):
        raise DataConfigError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if split not in datamodule.datasets:
        datamodule.setup("fit" if split in ("train", "val") else "test")
    dataset: Dataset | None = datamodule.datasets.get(split)
    if dataset is None:
        if split != "train":
            getattr(datamodule, f"{split}_dataloader")()  # raises the data module's own message
        raise DataConfigError(f"{type(datamodule).__name__} has no {split!r} split")
    if isinstance(dataset, IterableDataset):
        if max_samples is not None or split == "train":
            raise DataConfigError(f"{type(datamodule).__name__}: a streamed {split!r} split cannot be subset or probed")
        return getattr(datamodule, f"{split}_dataloader")()
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataConfigError(f"{type(datamodule).__name__}: the {split!r} split is empty")
    if wrap is not None:
        dataset = wrap(dataset)
    if max_samples is not None:
        if max_samples < 1:
            raise DataConfigError(f"max_samples must be >= 1, got {max_samples}")
        dataset = Subset(dataset, range(min(max_samples, len(dataset))))  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=datamodule.eval_batch_size,
        shuffle=False,
        num_workers=datamodule.num_workers,
        pin_memory=datamodule.pin_memory,
        persistent_workers=datamodule.num_workers > 0,
        collate_fn=collate_fn or datamodule.collate_fn,
    )


def _classes(datamodule: MomeDataModule, classnames: Sequence[str] | None, task: str) -> list[str]:
    names = list(classnames) if classnames is not None else list(getattr(datamodule, "classnames", None) or [])
    if not names:
        raise DataConfigError(f"eval_task={task} needs class names: {type(datamodule).__name__} has no classes")
    return names


def _templates(datamodule: MomeDataModule, templates: Sequence[str] | None, task: str) -> list[str]:
    """Prompt templates with ``{}`` (open_clip) or ``{c}`` (CLIP_benchmark) for the class name."""
    found = list(templates) if templates is not None else list(getattr(datamodule, "templates", None) or [])
    if not found:
        raise DataConfigError(f"eval_task={task} needs prompt templates: give eval_task.templates=[...]")
    found = [t.replace("{c}", "{}") for t in found]
    if any("{}" not in t for t in found):
        raise DataConfigError(f"eval_task.templates must contain '{{}}' or '{{c}}' for the class name, got {found}")
    return found


def has_audio(model: nn.Module) -> bool:
    """Whether ``model`` has the audio modality (``encode_audio`` and ``"audio"`` in its ``modality_names``)."""
    return hasattr(model, "encode_audio") and "audio" in (getattr(model, "modality_names", None) or ())


def _input_modalities(
    model: nn.Module, datamodule: MomeDataModule, asked: Sequence[str] | None, known: Sequence[str], task: str
) -> list[str]:
    """The modalities ``eval_task=<task>`` scores: ``asked`` (each one of ``known``), else every one of ``known``
    that the model has and the data module's samples carry (image always; audio with a model that has it and a
    data module whose ``modalities`` include it).

    Raises:
        TaskConfigError: an unknown modality, or audio asked of a model without it.
        DataConfigError: audio asked of a data module whose samples carry none.
    """
    carried = tuple(getattr(datamodule, "modalities", None) or ("image", "text"))
    if asked is None:
        return [m for m in known if m != "audio" or (has_audio(model) and "audio" in carried)]
    chosen = [str(m) for m in asked]
    if not chosen or any(m not in known for m in chosen) or len(set(chosen)) != len(chosen):
        raise TaskConfigError(f"eval_task.modalities must be distinct names among {list(known)}, got {list(asked)}")
    if "audio" in chosen and not has_audio(model):
        names = ", ".join(getattr(model, "modality_names", None) or ("image", "text"))
        raise TaskConfigError(f"eval_task={task} modalities=[..., audio]: the model's modalities are {names}")
    if "audio" in chosen and "audio" not in carried:
        raise DataConfigError(
            f"eval_task={task} scores audio, but {type(datamodule).__name__} gives {', '.join(carried)}: "
            "use data=digits data.task=image_text_audio"
        )
    return chosen


def processor_of(model: nn.Module, model_name: str, option: str) -> Any:
    """The processor of a transformers MoE VLM (:mod:`mome.models.hf_moe_vlm`), the one saved beside its weights
    (:func:`~mome.models.hf_moe_vlm.folder_processor`), which ``eval_task=<option>`` runs it through.

    Raises:
        TaskConfigError: the model's folder holds no processor (e.g. a tiny model built from its config).
    """
    from ..models import hf_moe_vlm

    processor = hf_moe_vlm.folder_processor(model, model_name)
    if processor is None:
        folder = getattr(model.config, "_name_or_path", "")
        where = f"in {folder}" if folder else "beside its weights: it was built from a config"
        raise TaskConfigError(
            f"eval_task={option}: {model_name} has no processor (no {' or '.join(hf_moe_vlm.PROCESSOR_FILES)} "
            f"{where}): its family's processor (chat template, image handling) reads the inputs; load a folder or Hub "
            "repo with its processor saved beside the weights (model=local-dir:FOLDER or model=hf-hub:ORG/REPO, "
            "hf_moe_vlm.save_tiny for the tiny models)"
        )
    return processor


def patch_grid(model: nn.Module, images: Tensor | None = None) -> tuple[int, int] | None:
    """``(H_p, W_p)``: the patch grid of ``images [B, C, H, W]`` in ``model``'s timm ``patch_embed`` (V-MoE,
    Soft MoE ViT, LIMoE, VLMo), or None for a model without one."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or getattr(embed, "grid_size", None) is None:
        return None
    if images is not None and hasattr(embed, "dynamic_feat_size") and getattr(embed, "dynamic_img_size", False):
        height, width = embed.dynamic_feat_size(tuple(images.shape[-2:]))
        return int(height), int(width)
    return int(embed.grid_size[0]), int(embed.grid_size[1])


# ------------------------------------------------------------------------------------------- base
class EvaluationTask(L.LightningModule, abc.ABC):
    """Base of the evaluation tasks: no training; exact under DDP; routing counted; results written.

    Args:
        model: the model to evaluate (built by ``mome-eval``; kept in eval mode).
        model_name: the name written in the results.
        routing_report: write the routing report of the MoE layers (:class:`RoutingRecorder`): ``routing.json``
            and its figures. The dropped share of the routed tokens, per layer and modality, is always counted
            and written in ``results.json`` (``routing``).
        eval_capacity: the MoE capacity while evaluating: ``"dropless"`` (default: the results are a function of
            the model and the samples, not of how they are batched), ``"model"`` (the layers' own eval capacity,
            e.g. a V-MoE card's) or a capacity factor (:class:`mome.lit.base.EvalCapacity`).
        routing_maps: with ``routing_report``, the patch routing maps of the first this many images of the
            evaluated split (rank 0's under DDP): ``routing_patches.json`` and ``routing_patch_map.png``
            (:meth:`RoutingRecorder.capture_patches`); 0: none.
    """

    #: the task's name in the results (CLIP_benchmark's where it has one)
    name: ClassVar[str] = ""
    #: its ``conf/eval_task`` file (``eval_task=<option>``), used in messages
    option: ClassVar[str] = ""

    tokenizer = MomeTask.tokenizer  # the model's tokenizer, from its pretrained cfg

    def __init__(
        self,
        model: nn.Module,
        model_name: str = "",
        routing_report: bool = True,
        eval_capacity: str | float | None = "dropless",
        routing_maps: int = 8,
    ) -> None:
        super().__init__()
        if isinstance(routing_maps, bool) or not isinstance(routing_maps, int) or routing_maps < 0:
            raise TaskConfigError(f"routing_maps must be a number of images >= 0, got {routing_maps!r}")
        self.routing_maps = routing_maps
        self.eval_capacity = EvalCapacity(eval_capacity)
        self.model = model.eval().requires_grad_(False)
        self.model_name = model_name or str(getattr(model, "mome_model_name", type(model).__name__))
        self.routing_report = routing_report
        self.classnames: list[str] = []
        self.results: dict[str, float] = {}
        self.num_samples = 0
        self.output_dir: Path | None = None
        self.record_fields: dict[str, Any] = {}
        self.measure_cost = False  # record one sample's parameters and FLOPs (mome._flops) as ``cost``
        self.written: dict[str, Path] = {}
        self._tokenizer = None
        self._recorder: RoutingRecorder | None = None
        self._planned: list[list[Tensor]] = []  # per loader: dataset indices of each batch of this process
        self._keep: list[list[Tensor] | None] = []  # per loader: first-occurrence masks (DDP only)
        self._indices: list[list[Tensor]] = []  # per loader: indices of the samples evaluated here
        self._batch_indices: Tensor | None = None  # dataset indices of the batch being evaluated (maps only)
        self._start = 0.0
        self.top_k: int | None = None  # routing controls of a transformers MoE VLM (set_routing_controls)
        self.disabled_experts: list[int] | None = None
        self._routing_undo: list[Callable[[], Any]] = []

    # -- what a task defines ------------------------------------------------------------------------
    @property
    def needs_text(self) -> bool:
        """Whether the task reads captions from the batches (``False``: class names and labels suffice)."""
        return False

    def check_data(self, datamodule_class: type) -> None:
        """Fail early (before the data module is built) when its class cannot feed the task: the image
        tasks read images with labels or captions, not question-answer conversations.

        Raises:
            DataConfigError: naming the task and the data module.
        """
        if issubclass(datamodule_class, ConversationDataModule):
            raise DataConfigError(
                f"eval_task={self.option} reads images with labels or captions, but {datamodule_class.__name__} "
                "holds question-answer conversations: use eval_task=vqa with a MoE-LLaVA model"
            )

    def bind_data(self, datamodule: MomeDataModule) -> None:
        """Bind the data module to the model's preprocessing and tokenizer (``mome-eval`` calls this before
        ``setup``)."""
        datamodule.bind(self.model, self.tokenizer)

    def dataloaders(self, datamodule: MomeDataModule, split: str, max_samples: int | None = None) -> list[DataLoader]:
        """Check that the data fit the task and return the loaders of ``Trainer.test``."""
        self.check_data(type(datamodule))
        return [split_loader(datamodule, split, max_samples)]

    @abc.abstractmethod
    def evaluate_batch(self, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        """Update the task's state with one de-duplicated batch."""

    @abc.abstractmethod
    def compute(self) -> dict[str, float]:
        """The metrics of the whole set (called on every process after the last batch)."""

    def protocol(self) -> dict[str, Any]:
        """What a reader needs to reproduce the numbers (templates, k, probe settings)."""
        return {}

    # -- routing controls of transformers' MoE VLMs ---------------------------------------------------
    def set_routing_controls(self, top_k: int | None, disabled_experts: Sequence[int] | None) -> None:
        """Route every token of a transformers MoE VLM (:mod:`mome.models.hf_moe_vlm`) to ``top_k`` experts
        (:func:`~mome.models.hf_moe_vlm.set_top_k`; None: the model's own) and none to ``disabled_experts``
        (:func:`~mome.models.hf_moe_vlm.disable_experts`, in every router; None: none) while the test runs: they are
        applied when it starts and undone when it ends, the model restored exactly. Each is tried once here (then
        undone), so that a bad value fails before the run with the routers' own one-line
        :class:`~mome.InvalidArgumentError`.

        Raises:
            TaskConfigError: a control given for a model that is not a transformers MoE VLM.
        """
        from ..models import hf_moe_vlm

        self.top_k, self.disabled_experts = top_k, None if disabled_experts is None else list(disabled_experts)
        given = [name for name in ("top_k", "disabled_experts") if getattr(self, name) is not None]
        if given and not hf_moe_vlm.is_hf_moe_vlm(self.model):
            raise TaskConfigError(
                f"eval_task.{given[0]} applies to transformers' MoE VLMs (mome.models.hf_moe_vlm); {self.model_name} "
                f"is a {type(self.model).__name__}"
            )
        self._apply_routing_controls()
        self._undo_routing_controls()

    def routing_controls(self) -> dict[str, Any]:
        """The routing controls given (``top_k``, ``disabled_experts``), for the results' protocol."""
        controls = {"top_k": self.top_k, "disabled_experts": self.disabled_experts}
        return {name: value for name, value in controls.items() if value is not None}

    def _apply_routing_controls(self) -> None:
        from ..models import hf_moe_vlm

        if self.top_k is not None:
            previous = hf_moe_vlm.set_top_k(self.model, self.top_k)
            self._routing_undo.append(lambda: hf_moe_vlm.set_top_k(self.model, previous))
        if self.disabled_experts is not None:
            self._routing_undo.append(hf_moe_vlm.disable_experts(self.model, self.disabled_experts).remove)

    def _undo_routing_controls(self) -> None:
        while self._routing_undo:
            self._routing_undo.pop()()

    # -- helpers --------------------------------------------------------------------------------------
    def _require_clip(self) -> None:
        if not (hasattr(self.model, "encode_image") and hasattr(self.model, "encode_text")):
            raise TaskConfigError(
                f"eval_task={self.option} needs an open_clip-contract model (encode_image, encode_text); "
                f"{self.model_name} has none: use eval_task=classification or linear_probe"
            )
        if self.tokenizer is None:
            raise TaskConfigError(f"eval_task={self.option}: {self.model_name} has no tokenizer in its pretrained cfg")

    def image_features(self, image: Tensor, labels: Tensor | None = None) -> Tensor:
        """Unit-norm embeddings (CLIP-style models) or the pooled pre-logits features (timm ViTs)."""
        with self._routing_labels(labels), self._patch_capture(image):
            if hasattr(self.model, "encode_image"):
                return self.model.encode_image(image, normalize=True)
            return self.model.forward_head(self.model.forward_features(image), pre_logits=True)

    def audio_features(self, audio: Tensor) -> Tensor:
        """Unit-norm audio embeddings (a model with ``encode_audio``)."""
        return self.model.encode_audio(audio, normalize=True)

    def _routing_labels(self, labels: Tensor | None) -> Any:
        return nullcontext() if self._recorder is None else self._recorder.labels(labels)

    def _patch_capture(
        self,
        images: Tensor,
        grid: tuple[int, int] | None = None,
        token_positions: Tensor | None = None,
        num_tokens: int | None = None,
    ) -> Any:
        """Keep the patch routing maps of ``images`` (while fewer than ``routing_maps`` are kept, on rank 0, on
        the evaluated split); ``grid`` defaults to the model's ``patch_embed`` grid (:func:`patch_grid`)."""
        recorder = self._recorder
        if recorder is None or not self.routing_report or self._batch_indices is None or self.global_rank != 0:
            return nullcontext()
        remaining = self.routing_maps - len(recorder.patch_maps)
        grid = grid or patch_grid(self.model, images)
        if remaining <= 0 or grid is None or images.ndim != 4 or images.shape[0] == 0:
            return nullcontext()
        indices = self._batch_indices.tolist()
        if len(indices) != images.shape[0]:
            indices = None
        return recorder.capture_patches(images, grid, indices, token_positions, num_tokens, limit=remaining)

    def _routing_paused(self, pause: bool = True) -> Any:
        """Forward passes not counted in the routing report (e.g. the prompts on every process but one)."""
        return nullcontext() if self._recorder is None else self._recorder.paused(pause)

    def gather(self, tensor: Tensor) -> Tensor:
        """Concatenate ``tensor [n_rank, ...]`` of every process along dim 0 (any ``n_rank``, rank order)."""
        if self.trainer.world_size == 1:
            return tensor
        size = torch.tensor([tensor.shape[0]], device=self.device)
        sizes = self.all_gather(size).reshape(-1).tolist()
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = self.all_gather(padded)  # [W, max, ...]
        return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])

    def gather_objects(self, objects: list[Any]) -> list[Any]:
        """Concatenate the picklable ``objects`` of every process (rank order, as :meth:`gather`)."""
        if self.trainer.world_size == 1:
            return list(objects)
        gathered: list[list[Any]] = [[] for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather_object(gathered, list(objects))
        return [item for part in gathered for item in part]

    def gather_samples(self, dataloader_idx: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Gather per-sample tensors (in batch order on each process) and sort them by dataset index."""
        indices = self.gather(torch.cat(self._indices[dataloader_idx]).to(self.device))
        order = indices.argsort()
        return tuple(self.gather(t)[order].cpu() for t in tensors)

    # -- Lightning hooks ------------------------------------------------------------------------------
    def on_test_start(self) -> None:
        if self.measure_cost:  # here, not before trainer.test: a transformers model that has run a forward
            # carries its output-capturing hooks (local functions), which ddp_spawn cannot pickle
            from .._flops import example_input, model_cost

            self.record_fields["cost"] = model_cost(self.model, example_input(self.model))  # one sample, dropless
        self._start = time.perf_counter()
        self.eval_capacity.enter(self.model)
        self._recorder = RoutingRecorder(num_classes=len(self.classnames)).attach(self.model)
        self._apply_routing_controls()  # here, not in __init__: ddp_spawn cannot pickle the hooks

    def on_test_epoch_start(self) -> None:
        loaders = self.trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        world, rank = self.trainer.world_size, self.global_rank
        plans = [plan_batches(loader, world, rank, self.all_gather, self.device) for loader in loaders]
        self._indices = [[] for _ in loaders]
        self._planned = [indices for indices, _ in plans]
        self._keep = [keep for _, keep in plans]
        self.num_samples = 0

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        planned = self._planned[dataloader_idx]
        if planned:
            indices = planned[batch_idx]
        else:  # streamed: running positions
            start = sum(t.numel() for t in self._indices[dataloader_idx])
            indices = torch.arange(start, start + batch_length(batch))
        keep = self._keep[dataloader_idx]
        if keep is not None:
            mask = keep[batch_idx]
            indices = indices[mask]
            batch = {k: select_samples(v, mask) for k, v in batch.items()}
            if not mask.any():
                return
        self._indices[dataloader_idx].append(indices)
        evaluated = dataloader_idx == len(self._indices) - 1  # not the linear probe's train split
        if evaluated:
            self.num_samples += int(indices.numel())
        self._batch_indices = indices if evaluated else None
        try:
            self.evaluate_batch(batch, dataloader_idx)
        finally:
            self._batch_indices = None

    def on_test_epoch_end(self) -> None:
        self.results = self.compute()
        total = torch.tensor(float(self.num_samples), device=self.device)
        self.num_samples = int(self.trainer.strategy.reduce(total, reduce_op="sum"))
        if self._recorder is not None:
            self._recorder.reduce(lambda t: self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum"))
        for key, value in self.results.items():
            self.log(key, value, sync_dist=False)
        self.log("n_samples", float(self.num_samples), sync_dist=False)

    def on_test_end(self) -> None:
        self._undo_routing_controls()
        self.eval_capacity.exit()
        if self._recorder is not None:
            self._recorder.detach()
        if self.output_dir is not None and self.trainer.is_global_zero:
            self.write(self.output_dir)

    def write(self, folder: Path) -> dict[str, Path]:
        """Write ``results.json`` (and the routing report) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fields = dict(self.record_fields)
        record = result_record(
            self.results,
            dataset=fields.pop("dataset", "unknown"),
            model=fields.pop("model", self.model_name),
            pretrained=fields.pop("pretrained", "none"),
            task=self.name,
            n_samples=self.num_samples,
            protocol=self.protocol(),
            param_count=sum(p.numel() for p in self.model.parameters()),
            wall_time_s=round(time.perf_counter() - self._start, 3),
            **fields,
        )
        if self._recorder is not None and self._recorder.layers:
            record["routing"] = {"eval_capacity": self.eval_capacity.value, **self._recorder.drops()}
        self.written = {"results": folder / "results.json"}
        if self.routing_report and self._recorder is not None and self._recorder.layers:
            report = {"model": record["model"], "dataset": record["dataset"], "task": self.name}
            report.update(self._recorder.report(self.classnames))
            written = write_routing_report(report, folder, self._recorder.patch_maps)
            self.written.update({f"routing_{k}": v for k, v in written.items()})
        self.written["results"].write_text(json.dumps(record, indent=2) + "\n")
        return self.written


# -------------------------------------------------------------------------------------------- tasks
class ZeroShotClassificationTask(EvaluationTask):
    """Zero-shot classification with class names x prompt templates (CLIP; see the module docstring).

    A transformers MoE VLM (:mod:`mome.models.hf_moe_vlm`), a generative model, classifies by likelihood through
    its family's processor (the one saved beside its weights, :func:`processor_of`): each image and ``question``
    make one user turn of the processor's chat template with the generation prompt, and every template filled with
    every class name is scored as the assistant's answer, ``log p(answer | image, question)``
    (:func:`~mome.models.hf_moe_vlm.answer_log_likelihoods`, one forward per image over all the answers); a class's
    score is the mean over its templates (``eval_task.templates=['{}']``: the class name alone), ranked for
    ``acc1``, ``acc5`` and ``mean_per_class_recall`` as above. The routing report counts one forward of each image's
    prompt (the answers' forward, with its pads, is not counted), per modality and class; no ``cost`` is recorded.

    Args:
        classnames: class names (default: the data module's ``classnames``).
        templates: prompt templates with ``{}`` or ``{c}`` (default: the data module's ``templates``).
        logit_scale: the logit multiplier (100, CLIP_benchmark's ``run_classification``).
        modalities: the inputs classified against the one text classifier, among ``image`` and ``audio``; the
            image metrics keep CLIP_benchmark's names (``acc1``, ...), the audio ones are prefixed (``audio_acc1``).
            None: the image, and the audio when the model has it and the data carry it.
        question: a transformers MoE VLM only: the user's text after the image (None: :attr:`QUESTION`).
        top_k, disabled_experts: a transformers MoE VLM only: the routing controls while evaluating, as for VQA
            (:meth:`~EvaluationTask.set_routing_controls`): the answers are scored and the prompts' routing counted
            with them.
    """

    #: the question a transformers MoE VLM answers with each class's templates
    QUESTION: ClassVar[str] = "What is in the image?"

    name = "zeroshot_classification"
    option = "zero_shot"
    #: the inputs a zero-shot classifier can score
    input_modalities: ClassVar[tuple[str, ...]] = ("image", "audio")

    def __init__(
        self,
        *args: Any,
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        logit_scale: float = 100.0,
        modalities: Sequence[str] | None = None,
        question: str | None = None,
        top_k: int | None = None,
        disabled_experts: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        from ..models import hf_moe_vlm

        self.processor: Any = None  # a transformers MoE VLM's own processor
        if hf_moe_vlm.is_hf_moe_vlm(self.model):
            self.processor = processor_of(self.model, self.model_name, "zero_shot")
        else:
            self._require_clip()
            if question is not None:
                raise TaskConfigError(
                    f"eval_task.question applies to transformers' MoE VLMs (mome.models.hf_moe_vlm); {self.model_name} "
                    f"is a {type(self.model).__name__}"
                )
        if question is not None and (not isinstance(question, str) or not question.strip()):
            raise TaskConfigError(f"eval_task.question must be a non-empty string, got {question!r}")
        self.question = self.QUESTION if question is None else question
        self.set_routing_controls(top_k, disabled_experts)
        self.classnames_override = classnames
        self.templates_override = templates
        self.templates: list[str] = []
        self.logit_scale = logit_scale
        self.modalities_override = None if modalities is None else list(modalities)
        self.modalities: list[str] = ["image"]
        self.classifier: Tensor | None = None
        self.metrics: dict[str, Any] = {}

    def dataloaders(self, datamodule: MomeDataModule, split: str, max_samples: int | None = None) -> list[DataLoader]:
        self.classnames = _classes(datamodule, self.classnames_override, "zero_shot")
        self.templates = _templates(datamodule, self.templates_override, "zero_shot")
        if len(self.classnames) < 2:
            raise DataConfigError(f"eval_task=zero_shot needs at least 2 classes, got {self.classnames}")
        known = self.input_modalities
        self.modalities = _input_modalities(self.model, datamodule, self.modalities_override, known, "zero_shot")
        if self.processor is not None:  # the PIL images, one list entry per sample, for the processor
            from ..data.questions import collate_questions

            self.check_data(type(datamodule))
            return [split_loader(datamodule, split, max_samples, collate_fn=collate_questions)]
        return super().dataloaders(datamodule, split, max_samples)

    def bind_data(self, datamodule: MomeDataModule) -> None:
        """A model with its own processor gets the raw images (``bind_raw``); a CLIP model its transforms."""
        if self.processor is not None:
            datamodule.bind_raw()
        else:
            super().bind_data(datamodule)

    def on_test_start(self) -> None:
        if self.processor is not None:
            self.measure_cost = False  # mome._flops would count a transformers model's experts as dense weights
        super().on_test_start()

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.metrics = {m: classification_metrics(len(self.classnames), "").to(self.device) for m in self.modalities}
        if self.processor is not None:
            return
        from open_clip import build_zero_shot_classifier

        with self._routing_paused(self.global_rank != 0):  # the prompts' routing is counted once
            self.classifier = build_zero_shot_classifier(
                self.model,
                self.tokenizer,
                self.classnames,
                self.templates,
                num_classes_per_batch=None,
                device=self.device,
            )  # [embed_dim, num_classes]

    def evaluate_batch(self, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        if self.processor is not None:
            labels = torch.as_tensor(batch["label"], device=self.device)
            self.metrics["image"].update(self._answer_scores(batch["image"], labels), labels)
            return
        for modality, metrics in self.metrics.items():
            if modality == "image":
                features = self.image_features(batch["image"], batch["label"])
            else:
                features = self.audio_features(batch["audio"])
            metrics.update(self.logit_scale * features @ self.classifier, batch["label"])

    def _answer_scores(self, images: list[Any], labels: Tensor) -> Tensor:
        """``[B, C]``: each class's mean log-likelihood over its templates, as the answer to each image's question
        (a transformers MoE VLM); with the routing report, one counted forward of each image's prompt."""
        from ..models import hf_moe_vlm

        content = [{"type": "image"}, {"type": "text", "text": self.question}]
        answers = [template.format(name) for name in self.classnames for template in self.templates]  # class-major
        scores = []
        for image, label in zip(images, labels, strict=True):
            with self._routing_paused():  # the answers' pads would be routed and counted
                log_likelihoods = hf_moe_vlm.answer_log_likelihoods(
                    self.model, self.processor, content, [image], answers
                )
            if self.routing_report:
                prompt = hf_moe_vlm.chat_prompt(self.processor, content)
                with torch.no_grad(), self._routing_labels(label[None]):
                    self.model(**hf_moe_vlm.processor_inputs(self.model, self.processor, [prompt], [image]))
            scores.append(log_likelihoods.view(len(self.classnames), len(self.templates)).mean(1))  # [C * T] -> [C]
        return torch.stack(scores)

    def compute(self) -> dict[str, float]:
        results: dict[str, float] = {}
        for modality, metrics in self.metrics.items():
            prefix = "" if modality == "image" else f"{modality}_"  # the image keeps CLIP_benchmark's names
            results.update({prefix + k: v for k, v in clip_benchmark_names(metrics.compute()).items()})
        return dict(sorted(results.items()))

    def protocol(self) -> dict[str, Any]:
        protocol = {
            "classnames": self.classnames,
            "templates": self.templates,
            "num_templates": len(self.templates),
            "modalities": self.modalities,
        }
        if self.processor is not None:
            protocol["scoring"] = (
                "log-likelihood of each template filled with the class name as the answer to the question, through "
                "the family's processor (its chat template with the generation prompt); mean over the templates"
            )
            protocol["question"] = self.question
        return {**protocol, **self.routing_controls()}


class RetrievalTask(EvaluationTask):
    """Image-text retrieval, recall@k in both directions (CLIP paper; CLIP_benchmark's names):
    ``text_retrieval_recall@k`` (image queries, text candidates) and ``image_retrieval_recall@k`` (text
    queries, image candidates). With audio (a model with ``encode_audio``, batches with ``"audio"``): every
    ordered pair with audio too, ``<query>_to_<candidate>_recall@k`` (``audio_to_text``, ``text_to_audio``,
    ``audio_to_image``, ``image_to_audio``). A sample's audio has the positives of its image among the texts; between
    audio and images the positives are the same class with ``class_templates`` captions (the texts' protocol) and
    the same sample with ``batch`` captions.

    Args:
        recall_k: the ``k`` of recall@k.
        captions: where the texts come from: ``"batch"``: the captions of each sample (``text [B, L]`` or
            ``[B, C, L]``; identical captions are one text whose positives are all their images);
            ``"class_templates"``: every template filled with every class name, positive for every image of
            that class (the labelled sets without captions, e.g. the embedded digits); ``"auto"``:
            ``class_templates`` when the data module has class names and templates, else ``batch``.
        templates: prompt templates for ``class_templates`` (default: the data module's).
        modalities: the modalities retrieved between: ``[image, text]`` or ``[image, text, audio]``; None: audio
            too when the model has it and the data carry it.
    """

    name = "zeroshot_retrieval"
    option = "retrieval"

    def __init__(
        self,
        *args: Any,
        recall_k: Sequence[int] = (1, 5, 10),
        captions: str = "auto",
        templates: Sequence[str] | None = None,
        modalities: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._require_clip()
        if captions not in ("auto", "batch", "class_templates"):
            raise TaskConfigError(f"eval_task.captions must be auto, batch or class_templates, got {captions!r}")
        if not recall_k or any(int(k) < 1 for k in recall_k):
            raise TaskConfigError(f"eval_task.recall_k must be positive integers, got {list(recall_k)}")
        if modalities is not None and not {"image", "text"} <= set(modalities):
            raise TaskConfigError(f"eval_task.modalities must hold image and text (and audio), got {list(modalities)}")
        self.recall_k = [int(k) for k in recall_k]
        self.captions = captions
        self.templates_override = templates
        self.templates: list[str] = []
        self.modalities_override = None if modalities is None else list(modalities)
        self.modalities: list[str] = ["image", "text"]
        self._images: list[Tensor] = []
        self._audios: list[Tensor] = []
        self._texts: list[Tensor] = []
        self._tokens: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._class_texts: Tensor | None = None

    @property
    def needs_text(self) -> bool:
        # "auto" reads the batch captions of a data module without class names (e.g. webdataset shards), which
        # is known only once the data module is built: keep the captions until then
        return self.captions != "class_templates"

    def dataloaders(self, datamodule: MomeDataModule, split: str, max_samples: int | None = None) -> list[DataLoader]:
        has_classes = bool(getattr(datamodule, "classnames", None)) and bool(getattr(datamodule, "templates", None))
        if self.captions == "auto":
            self.captions = "class_templates" if has_classes or self.templates_override else "batch"
        if self.captions == "class_templates":
            self.classnames = _classes(datamodule, None, "retrieval")
            self.templates = _templates(datamodule, self.templates_override, "retrieval")
        known = ("image", "text", "audio")
        self.modalities = _input_modalities(self.model, datamodule, self.modalities_override, known, "retrieval")
        return super().dataloaders(datamodule, split, max_samples)

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._images, self._audios, self._texts, self._tokens, self._labels = [], [], [], [], []
        if self.captions == "class_templates":
            texts = [t.format(c) for c in self.classnames for t in self.templates]  # class-major
            tokens = self.tokenizer(texts).to(self.device)
            with self._routing_paused(self.global_rank != 0):  # the prompts' routing is counted once
                self._class_texts = self.model.encode_text(tokens, normalize=True)  # [C * T, D]

    def evaluate_batch(self, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        if "audio" in self.modalities:
            self._audios.append(self.audio_features(batch["audio"]))
        if self.captions == "class_templates":
            self._images.append(self.image_features(batch["image"], batch["label"]))
            self._labels.append(batch["label"])
            return
        if "text" not in batch:
            raise DataConfigError("eval_task=retrieval with captions=batch needs captions in the batches (text)")
        self._images.append(self.image_features(batch["image"], batch.get("label")))
        tokens = batch["text"] if batch["text"].ndim == 3 else batch["text"][:, None]  # [B, C, L]
        texts = self.model.encode_text(tokens.flatten(0, 1), normalize=True)  # [B * C, D]
        self._texts.append(texts.view(*tokens.shape[:2], -1))
        self._tokens.append(tokens)

    def compute(self) -> dict[str, float]:
        audios = [torch.cat(self._audios)] if self._audios else []
        if self.captions == "class_templates":
            images, labels, *audios = self.gather_samples(0, torch.cat(self._images), torch.cat(self._labels), *audios)
            texts = self._class_texts.cpu()
            text_class = torch.arange(len(self.classnames)).repeat_interleave(len(self.templates))  # [C * T]
            positives = labels[:, None] == text_class[None, :]  # [N_img, N_txt]
            same_sample = labels[:, None] == labels[None, :]  # audio <-> image: the same class  [N, N]
        else:
            images, texts, tokens, *audios = self.gather_samples(
                0, torch.cat(self._images), torch.cat(self._texts), torch.cat(self._tokens), *audios
            )
            num_images, per_image = tokens.shape[:2]
            unique, inverse = torch.unique(tokens.flatten(0, 1), dim=0, return_inverse=True)  # identical captions
            first = torch.full((unique.shape[0],), inverse.numel(), dtype=torch.long)
            first.scatter_reduce_(0, inverse, torch.arange(inverse.numel()), reduce="amin")
            texts = texts.flatten(0, 1)[first]  # [U, D]
            positives = torch.zeros(num_images, unique.shape[0], dtype=torch.bool)
            positives[torch.arange(num_images).repeat_interleave(per_image), inverse] = True
            same_sample = torch.eye(num_images, dtype=torch.bool)  # audio <-> image: the sample's own pair
        scores = images.float() @ texts.float().T  # [N_img, N_txt]
        to_text = retrieval_recall_at_k(scores, positives, self.recall_k)
        to_image = retrieval_recall_at_k(scores.T, positives.T, self.recall_k)
        self.num_texts = int(texts.shape[0])
        metrics = {f"image_retrieval_recall@{k}": v for k, v in to_image.items()}
        metrics.update({f"text_retrieval_recall@{k}": v for k, v in to_text.items()})
        if audios:  # a sample's audio has its image's positives among the texts
            audio = audios[0].float()
            pairs = {
                ("audio", "text"): (audio @ texts.float().T, positives),  # [N, N_txt]
                ("audio", "image"): (audio @ images.float().T, same_sample),  # [N, N]
            }
            for (query, candidate), (pair_scores, pair_positives) in pairs.items():
                forward = retrieval_recall_at_k(pair_scores, pair_positives, self.recall_k)
                backward = retrieval_recall_at_k(pair_scores.T, pair_positives.T, self.recall_k)
                metrics.update({f"{query}_to_{candidate}_recall@{k}": v for k, v in forward.items()})
                metrics.update({f"{candidate}_to_{query}_recall@{k}": v for k, v in backward.items()})
        return metrics

    def protocol(self) -> dict[str, Any]:
        protocol: dict[str, Any] = {"recall_k": self.recall_k, "captions": self.captions, "ties": "pessimistic"}
        protocol["num_texts"] = getattr(self, "num_texts", None)
        protocol["modalities"] = self.modalities
        if "audio" in self.modalities:
            protocol["audio_image_positives"] = "same class" if self.captions == "class_templates" else "same sample"
        if self.captions == "class_templates":
            protocol.update(classnames=self.classnames, templates=self.templates)
        return protocol


class LinearProbeTask(EvaluationTask):
    """Logistic-regression probe on frozen image features (CLIP sec. 3.2; :func:`fit_linear_probe`).

    The probe is fitted on the *train* split (loaded with the evaluation transform) and scored on the
    evaluation split; both run in ``Trainer.test`` as two dataloaders (0: train, 1: evaluation).

    Args:
        C: inverse L2 regularisation strength of the logistic regression.
        max_iter: L-BFGS iterations.
        max_train_samples: fit on the first N train samples only (None: all).
    """

    name = "linear_probe"
    option = "linear_probe"

    def __init__(
        self, *args: Any, C: float = 1.0, max_iter: int = 1000, max_train_samples: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if C <= 0:
            raise TaskConfigError(f"eval_task.C must be > 0, got {C}")
        self.C, self.max_iter, self.max_train_samples = float(C), int(max_iter), max_train_samples
        self._features: list[list[Tensor]] = [[], []]
        self._labels: list[list[Tensor]] = [[], []]

    def dataloaders(self, datamodule: MomeDataModule, split: str, max_samples: int | None = None) -> list[DataLoader]:
        self.classnames = _classes(datamodule, None, "linear_probe")
        if split == "train":
            raise DataConfigError("eval_task=linear_probe fits on the train split: evaluate on split=val or test")
        return [split_loader(datamodule, "train", self.max_train_samples), split_loader(datamodule, split, max_samples)]

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._features, self._labels = [[], []], [[], []]

    def evaluate_batch(self, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        with self._routing_paused(dataloader_idx == 0):  # the routing report covers the evaluated split only
            self._features[dataloader_idx].append(self.image_features(batch["image"], batch["label"]).float())
        self._labels[dataloader_idx].append(batch["label"])

    def compute(self) -> dict[str, float]:
        train_x, train_y = self.gather_samples(0, torch.cat(self._features[0]), torch.cat(self._labels[0]))
        test_x, test_y = self.gather_samples(1, torch.cat(self._features[1]), torch.cat(self._labels[1]))
        probs = fit_linear_probe(train_x, train_y, test_x, self.C, self.max_iter)
        num_classes = max(len(self.classnames), probs.shape[1])
        probs = F.pad(probs, (0, num_classes - probs.shape[1]))
        metrics = classification_metrics(num_classes, "")
        metrics.update(probs, test_y)
        return clip_benchmark_names(metrics.compute())

    def protocol(self) -> dict[str, Any]:
        return {
            "probe": "sklearn LogisticRegression (lbfgs) on standardised features",
            "C": self.C,
            "max_iter": self.max_iter,
            "train_split": "train",
        }


class ClassificationEvalTask(EvaluationTask):
    """The model's own classifier: ``acc1``, ``acc5`` and mean per-class recall (torchmetrics)."""

    name = "classification"
    option = "classification"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_classes = int(getattr(self.model, "num_classes", 0) or 0)
        if self.num_classes < 2:
            raise TaskConfigError(
                f"eval_task=classification needs a classifier head: {self.model_name} has "
                f"num_classes={self.num_classes} (set model.num_classes, or use zero_shot / linear_probe)"
            )
        self.metrics = None

    def dataloaders(self, datamodule: MomeDataModule, split: str, max_samples: int | None = None) -> list[DataLoader]:
        self.classnames = _classes(datamodule, None, "classification")
        if len(self.classnames) != self.num_classes:
            raise DataConfigError(
                f"{type(datamodule).__name__} has {len(self.classnames)} classes but {self.model_name} "
                f"predicts {self.num_classes}"
            )
        return super().dataloaders(datamodule, split, max_samples)

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.metrics = classification_metrics(self.num_classes, "").to(self.device)

    def evaluate_batch(self, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        with self._routing_labels(batch["label"]), self._patch_capture(batch["image"]):
            logits = self.model(batch["image"])
        self.metrics.update(logits, batch["label"])

    def compute(self) -> dict[str, float]:
        return clip_benchmark_names(self.metrics.compute())
