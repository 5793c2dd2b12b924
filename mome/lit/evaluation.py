"""Evaluation tasks of ``mome-eval``: LightningModules run with ``Trainer.test``, and their metrics.

Each task takes a built model (from the zoo, a saved folder or a ``mome-train`` checkpoint) and reports
metrics named as CLIP_benchmark names them, as fractions in ``[0, 1]``:

- :class:`ZeroShotClassificationTask` (``zero_shot``): one classifier column per class, the mean of the
  L2-normalised text embeddings of its prompts, renormalised (open_clip's ``build_zero_shot_classifier``,
  CLIP, Radford et al. 2021, sec. 3.1.4); logits ``100 * u @ W`` for the unit image embedding ``u``;
  ``acc1``, ``acc5`` and ``mean_per_class_recall`` (torchmetrics; ``acc5`` only with more than 5 classes).
- :class:`RetrievalTask` (``retrieval``): image->text and text->image recall@k counted as in the CLIP
  paper (a query scores 1 when *any* of its positives is among its top k; :func:`retrieval_recall_at_k`).
- :class:`LinearProbeTask` (``linear_probe``): L2-regularised logistic regression (scikit-learn L-BFGS, as
  CLIP's linear-probe protocol, sec. 3.2) fitted on frozen features of the train split, scored on the
  evaluation split: ``acc1``, ``acc5``, ``mean_per_class_recall``.
- :class:`ClassificationEvalTask` (``classification``): the model's own classifier head (V-MoE, Soft MoE):
  ``acc1``, ``acc5``, ``mean_per_class_recall`` (timm's ``validate.py`` top-1/top-5, in fractions).
- :class:`VQAEvalTask` (``vqa``): MoE-LLaVA models on question-answer conversations (e.g. the synthetic
  shapes set): the greedy answer to each record's first question, scored by exact match after
  :func:`mome.lit.llava.normalize_answer` (the code ``LLaVATask.test_step`` runs:
  :func:`mome.lit.llava.answer_questions`): ``exact_match`` and ``exact_match/<question type>``, with
  every answer in ``predictions.jsonl``.

A new task subclasses :class:`EvaluationTask` (``name``, ``option``, and ``evaluate_batch`` / ``compute``;
``check_data`` and ``dataloaders`` to check the data, ``protocol`` to record settings) and gets a
``conf/eval_task/<option>.yaml`` (``_target_`` + its options); batches may hold any tensors, and lists
with one entry per sample.

**No sample counted twice under DDP.** Lightning's ``DistributedSampler`` pads the evaluation set by
repeating samples so that every process gets as many (PL #11479). At the start of the test epoch every
process lists the dataset indices of its batches; the lists are gathered and a sample is kept only at
its first place in the padded order ``position * world_size + rank``. The duplicates are removed from the
batch before the model sees it, so metrics, gathered features and routing counts are exact; per-sample
outputs are gathered and sorted by dataset index, so the numbers equal a single-process run.

Results follow the CLIP_benchmark JSON schema (:data:`RESULT_SCHEMA`), written with the routing report
(:mod:`mome.lit.routing_report`) to the run's output folder by the task itself (rank 0), which also
works under ``ddp_spawn``.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from .. import __version__
from ..data.base import DataConfigError, MomeDataModule
from ..data.conversation import IMAGE_PLACEHOLDER, ConversationDataModule, ConversationDataset, _WithPrompts
from . import llava
from .base import MomeTask, TaskConfigError
from .classification import classification_metrics
from .routing_report import RoutingRecorder, write_routing_report

__all__ = [
    "RESULT_SCHEMA",
    "ClassificationEvalTask",
    "EvaluationTask",
    "LinearProbeTask",
    "RetrievalTask",
    "VQAEvalTask",
    "ZeroShotClassificationTask",
    "fit_linear_probe",
    "result_record",
    "retrieval_recall_at_k",
    "split_loader",
]

#: The results record: CLIP_benchmark's keys (``dataset``, ``model``, ``pretrained``, ``task``, ``metrics``,
#: ``language``) plus the protocol (templates, sizes, versions). Metric values are fractions in [0, 1].
RESULT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "mome-eval result (CLIP_benchmark schema; metrics are fractions in [0, 1])",
    "type": "object",
    "required": ["dataset", "model", "pretrained", "task", "metrics"],
    "properties": {
        "dataset": {"type": "string"},
        "model": {"type": "string"},
        "pretrained": {"type": "string"},
        "task": {"type": "string"},
        "language": {"type": "string"},
        "metrics": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "n_samples": {"type": "integer", "minimum": 1},
        "split": {"type": "string"},
        "protocol": {"type": "object"},
        "param_count": {"type": "number"},
        "mome_version": {"type": "string"},
        "torch_version": {"type": "string"},
        "wall_time_s": {"type": "number"},
    },
}


# ------------------------------------------------------------------------------------------ metrics
def retrieval_recall_at_k(scores: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@k as the CLIP paper counts it (CLIP_benchmark's ``zeroshot_retrieval``): the share of queries
    with at least one positive among their ``k`` best-scored candidates.

    ``scores [Q, C]``: query x candidate similarities; ``positives [Q, C]`` bool (several per query allowed).
    With ``s*`` the best score of a query's positives, its rank is ``1 + #{negatives c: s_c >= s*}``: a
    negative tied with the best positive is ranked before it (so a model with constant scores gets no
    credit), and ``recall@k = mean_q [rank_q <= k]``. Without ties this is torchmetrics'
    ``RetrievalHitRate(top_k=k)``. A query without positives counts as a miss.
    """
    if scores.shape != positives.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} must be equal [Q, C]")
    positives = positives.bool()
    scores = scores.float()
    best_positive = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)  # [Q, 1]
    rank = 1 + ((scores >= best_positive) & ~positives).sum(dim=1)  # [Q]
    rank = rank.masked_fill(~positives.any(dim=1), scores.shape[1] + 1)
    return {int(k): float((rank <= k).float().mean()) for k in ks}


def fit_linear_probe(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, C: float = 1.0, max_iter: int = 1000
) -> Tensor:
    """Class probabilities ``[N_test, num_classes]`` of an L2-regularised multinomial logistic regression
    (scikit-learn ``LogisticRegression``, L-BFGS, inverse regularisation ``C``; CLIP's linear-probe protocol)
    fitted on standardised train features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    probe.fit(train_features.double().numpy(), train_labels.numpy())
    probs = torch.from_numpy(probe.predict_proba(test_features.double().numpy())).float()
    classes = torch.as_tensor(probe.classes_, dtype=torch.long)
    full = torch.zeros(probs.shape[0], int(max(classes.max(), train_labels.max())) + 1)  # classes absent from train
    full[:, classes] = probs
    return full


def result_record(
    metrics: Mapping[str, float],
    *,
    dataset: str,
    model: str,
    pretrained: str,
    task: str,
    n_samples: int,
    **extra: Any,
) -> dict[str, Any]:
    """One results record in the CLIP_benchmark schema (:data:`RESULT_SCHEMA`)."""
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": task,
        "metrics": {name: float(value) for name, value in metrics.items()},
        "language": "en",
        "n_samples": int(n_samples),
        "mome_version": __version__,
        "torch_version": torch.__version__,
        **extra,
    }


def _renamed(metrics: Mapping[str, Tensor]) -> dict[str, float]:
    """torchmetrics' ``top1``/``top5`` as CLIP_benchmark's ``acc1``/``acc5``."""
    names = {"top1": "acc1", "top5": "acc5"}
    renamed = {names.get(k, k): float(v) for k, v in metrics.items()}
    return dict(sorted(renamed.items()))  # acc1, acc5, mean_per_class_recall


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


def _select(value: Any, mask: Tensor) -> Any:
    """The samples of a batch entry that ``mask [B]`` keeps: tensors by their first dim, per-sample lists."""
    if isinstance(value, Tensor):
        return value[mask.to(value.device)]
    if isinstance(value, list) and len(value) == mask.numel():
        return [item for item, keep in zip(value, mask.tolist()) if keep]
    return value


def _batch_size(batch: Mapping[str, Any]) -> int:
    """Samples in a batch: the first dim of its first tensor, else the length of its first list."""
    for value in batch.values():
        if isinstance(value, Tensor):
            return int(value.shape[0])
    return next(len(v) for v in batch.values() if isinstance(v, list))


# ------------------------------------------------------------------------------------------- base
class EvaluationTask(L.LightningModule, abc.ABC):
    """Base of the evaluation tasks: no training; exact under DDP; routing counted; results written.

    Args:
        model: the model to evaluate (built by ``mome-eval``; kept in eval mode).
        model_name: the name written in the results.
        routing_report: count the routing of the MoE layers (:class:`RoutingRecorder`).
    """

    #: the task's name in the results (CLIP_benchmark's where it has one)
    name: ClassVar[str] = ""
    #: its ``conf/eval_task`` file (``eval_task=<option>``), used in messages
    option: ClassVar[str] = ""

    tokenizer = MomeTask.tokenizer  # the model's tokenizer, from its pretrained cfg

    def __init__(self, model: nn.Module, model_name: str = "", routing_report: bool = True) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.model_name = model_name or str(getattr(model, "mome_model_name", type(model).__name__))
        self.routing_report = routing_report
        self.classnames: list[str] = []
        self.results: dict[str, float] = {}
        self.num_samples = 0
        self.output_dir: Path | None = None
        self.record_fields: dict[str, Any] = {}
        self.written: dict[str, Path] = {}
        self._tokenizer = None
        self._recorder: RoutingRecorder | None = None
        self._planned: list[list[Tensor]] = []  # per loader: dataset indices of each batch of this process
        self._keep: list[list[Tensor] | None] = []  # per loader: first-occurrence masks (DDP only)
        self._indices: list[list[Tensor]] = []  # per loader: indices of the samples evaluated here
        self._start = 0.0

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
        with self._routing_labels(labels):
            if hasattr(self.model, "encode_image"):
                return self.model.encode_image(image, normalize=True)
            return self.model.forward_head(self.model.forward_features(image), pre_logits=True)

    def _routing_labels(self, labels: Tensor | None) -> Any:
        return nullcontext() if self._recorder is None else self._recorder.labels(labels)

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

    def _plan(self, loader: DataLoader) -> tuple[list[Tensor], list[Tensor] | None]:
        """Dataset indices of each batch of this process and, under DDP, the mask of first occurrences."""
        batch_sampler = getattr(loader, "batch_sampler", None)
        if batch_sampler is None:  # a streamed dataset shards itself: no padding, indices in order
            return [], None
        batches = [torch.as_tensor(list(b), dtype=torch.long) for b in batch_sampler]
        if self.trainer.world_size == 1:
            return batches, None
        local = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.long)
        world = self.trainer.world_size
        sizes = self.all_gather(torch.tensor([local.numel()], device=self.device)).reshape(-1).tolist()
        padded = torch.full((max(sizes),), -1, dtype=torch.long, device=self.device)
        padded[: local.numel()] = local.to(self.device)
        table = self.all_gather(padded).reshape(world, -1).cpu()  # [W, P]
        flat = table.t().reshape(-1)  # the padded order: position * world_size + rank
        order = torch.arange(flat.numel())
        unique, inverse = torch.unique(flat, return_inverse=True)
        first = torch.full((unique.numel(),), flat.numel(), dtype=torch.long).scatter_reduce_(
            0, inverse, order, reduce="amin"
        )
        keep = ((first[inverse] == order) & (flat >= 0)).reshape(-1, world).t()[self.global_rank]  # [P]
        return batches, list(keep[: local.numel()].split([b.numel() for b in batches]))

    # -- Lightning hooks ------------------------------------------------------------------------------
    def on_test_start(self) -> None:
        self._start = time.perf_counter()
        if self.routing_report:
            self._recorder = RoutingRecorder(num_classes=len(self.classnames)).attach(self.model)

    def on_test_epoch_start(self) -> None:
        loaders = self.trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        plans = [self._plan(loader) for loader in loaders]
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
            indices = torch.arange(start, start + _batch_size(batch))
        keep = self._keep[dataloader_idx]
        if keep is not None:
            mask = keep[batch_idx]
            indices = indices[mask]
            batch = {k: _select(v, mask) for k, v in batch.items()}
            if not mask.any():
                return
        self._indices[dataloader_idx].append(indices)
        if dataloader_idx == len(self._indices) - 1:
            self.num_samples += int(indices.numel())
        self.evaluate_batch(batch, dataloader_idx)

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
        self.written = {"results": folder / "results.json"}
        if self._recorder is not None and self._recorder.layers:
            report = {"model": record["model"], "dataset": record["dataset"], "task": self.name}
            report.update(self._recorder.report(self.classnames))
            self.written.update({f"routing_{k}": v for k, v in write_routing_report(report, folder).items()})
        self.written["results"].write_text(json.dumps(record, indent=2) + "\n")
        return self.written


# -------------------------------------------------------------------------------------------- tasks
class ZeroShotClassificationTask(EvaluationTask):
    """Zero-shot classification with class names x prompt templates (CLIP; see the module docstring).

    Args:
        classnames: class names (default: the data module's ``classnames``).
        templates: prompt templates with ``{}`` or ``{c}`` (default: the data module's ``templates``).
        logit_scale: the logit multiplier (100, CLIP_benchmark's ``run_classification``).
    """

    name = "zeroshot_classification"
    option = "zero_shot"

    def __init__(
        self,
        *args: Any,
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        logit_scale: float = 100.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._require_clip()
        self.classnames_override = classnames
        self.templates_override = templates
        self.templates: list[str] = []
        self.logit_scale = logit_scale
        self.classifier: Tensor | None = None
        self.metrics = None

    def dataloaders(self, datamodule: MomeDataModule, split: str, max_samples: int | None = None) -> list[DataLoader]:
        self.classnames = _classes(datamodule, self.classnames_override, "zero_shot")
        self.templates = _templates(datamodule, self.templates_override, "zero_shot")
        if len(self.classnames) < 2:
            raise DataConfigError(f"eval_task=zero_shot needs at least 2 classes, got {self.classnames}")
        return super().dataloaders(datamodule, split, max_samples)

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        from open_clip import build_zero_shot_classifier

        self.metrics = classification_metrics(len(self.classnames), "").to(self.device)
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
        features = self.image_features(batch["image"], batch["label"])
        self.metrics.update(self.logit_scale * features @ self.classifier, batch["label"])

    def compute(self) -> dict[str, float]:
        return _renamed(self.metrics.compute())

    def protocol(self) -> dict[str, Any]:
        return {"classnames": self.classnames, "templates": self.templates, "num_templates": len(self.templates)}


class RetrievalTask(EvaluationTask):
    """Image-text retrieval, recall@k in both directions (CLIP paper; CLIP_benchmark's names):
    ``text_retrieval_recall@k`` (image queries, text candidates) and ``image_retrieval_recall@k`` (text
    queries, image candidates).

    Args:
        recall_k: the ``k`` of recall@k.
        captions: where the texts come from: ``"batch"``: the captions of each sample (``text [B, L]`` or
            ``[B, C, L]``; identical captions are one text whose positives are all their images);
            ``"class_templates"``: every template filled with every class name, positive for every image of
            that class (the labelled sets without captions, e.g. the embedded digits); ``"auto"``:
            ``class_templates`` when the data module has class names and templates, else ``batch``.
        templates: prompt templates for ``class_templates`` (default: the data module's).
    """

    name = "zeroshot_retrieval"
    option = "retrieval"

    def __init__(
        self,
        *args: Any,
        recall_k: Sequence[int] = (1, 5, 10),
        captions: str = "auto",
        templates: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._require_clip()
        if captions not in ("auto", "batch", "class_templates"):
            raise TaskConfigError(f"eval_task.captions must be auto, batch or class_templates, got {captions!r}")
        if not recall_k or any(int(k) < 1 for k in recall_k):
            raise TaskConfigError(f"eval_task.recall_k must be positive integers, got {list(recall_k)}")
        self.recall_k = [int(k) for k in recall_k]
        self.captions = captions
        self.templates_override = templates
        self.templates: list[str] = []
        self._images: list[Tensor] = []
        self._texts: list[Tensor] = []
        self._tokens: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._class_texts: Tensor | None = None

    @property
    def needs_text(self) -> bool:
        return self.captions == "batch"

    def dataloaders(self, datamodule: MomeDataModule, split: str, max_samples: int | None = None) -> list[DataLoader]:
        has_classes = bool(getattr(datamodule, "classnames", None)) and bool(getattr(datamodule, "templates", None))
        if self.captions == "auto":
            self.captions = "class_templates" if has_classes or self.templates_override else "batch"
        if self.captions == "class_templates":
            self.classnames = _classes(datamodule, None, "retrieval")
            self.templates = _templates(datamodule, self.templates_override, "retrieval")
        return super().dataloaders(datamodule, split, max_samples)

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._images, self._texts, self._tokens, self._labels = [], [], [], []
        if self.captions == "class_templates":
            texts = [t.format(c) for c in self.classnames for t in self.templates]  # class-major
            tokens = self.tokenizer(texts).to(self.device)
            with self._routing_paused(self.global_rank != 0):  # the prompts' routing is counted once
                self._class_texts = self.model.encode_text(tokens, normalize=True)  # [C * T, D]

    def evaluate_batch(self, batch: dict[str, Tensor], dataloader_idx: int) -> None:
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
        if self.captions == "class_templates":
            images, labels = self.gather_samples(0, torch.cat(self._images), torch.cat(self._labels))
            texts = self._class_texts.cpu()
            text_class = torch.arange(len(self.classnames)).repeat_interleave(len(self.templates))  # [C * T]
            positives = labels[:, None] == text_class[None, :]  # [N_img, N_txt]
        else:
            images, texts, tokens = self.gather_samples(
                0, torch.cat(self._images), torch.cat(self._texts), torch.cat(self._tokens)
            )
            num_images, per_image = tokens.shape[:2]
            unique, inverse = torch.unique(tokens.flatten(0, 1), dim=0, return_inverse=True)  # identical captions
            first = torch.full((unique.shape[0],), inverse.numel(), dtype=torch.long)
            first.scatter_reduce_(0, inverse, torch.arange(inverse.numel()), reduce="amin")
            texts = texts.flatten(0, 1)[first]  # [U, D]
            positives = torch.zeros(num_images, unique.shape[0], dtype=torch.bool)
            positives[torch.arange(num_images).repeat_interleave(per_image), inverse] = True
        scores = images.float() @ texts.float().T  # [N_img, N_txt]
        to_text = retrieval_recall_at_k(scores, positives, self.recall_k)
        to_image = retrieval_recall_at_k(scores.T, positives.T, self.recall_k)
        self.num_texts = int(texts.shape[0])
        metrics = {f"image_retrieval_recall@{k}": v for k, v in to_image.items()}
        metrics.update({f"text_retrieval_recall@{k}": v for k, v in to_text.items()})
        return metrics

    def protocol(self) -> dict[str, Any]:
        protocol: dict[str, Any] = {"recall_k": self.recall_k, "captions": self.captions, "ties": "pessimistic"}
        protocol["num_texts"] = getattr(self, "num_texts", None)
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
        return _renamed(metrics.compute())

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
        with self._routing_labels(batch["label"]):
            logits = self.model(batch["image"])
        self.metrics.update(logits, batch["label"])

    def compute(self) -> dict[str, float]:
        return _renamed(self.metrics.compute())


class _QuestionSamples(Dataset):
    """The samples of :class:`VQAEvalTask`: each conversation record's first question (its generation
    prompt and images, from the data module's test-time prompts) with its reference answer and type."""

    def __init__(self, dataset: Dataset) -> None:
        if not isinstance(dataset, ConversationDataset):
            raise DataConfigError(f"eval_task=vqa needs conversation records, got {type(dataset).__name__}")
        self.prompts = _WithPrompts(dataset)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.prompts[index]
        question = self.prompts.dataset.turns[index][0]["value"]
        return {
            "id": str(sample["id"]),
            "question": question.replace(IMAGE_PLACEHOLDER, " ").strip(),
            "prompt_ids": sample["prompt_ids"],
            "prompt_images": sample["prompt_images"],
            "answers": sample["answers"],
            "question_types": sample["question_types"],
        }


def _collate_questions(samples: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-sample lists (prompts differ in length and are generated one at a time)."""
    return {key: [sample[key] for sample in samples] for key in samples[0]}


class VQAEvalTask(EvaluationTask):
    """VQA exact match of a MoE-LLaVA model on question-answer conversations (e.g. ``data=shapes``).

    For each record the first question is put in the chat template (``encode_prompt``, with its images),
    a greedy answer of at most ``max_new_tokens`` tokens is generated and compared with the reference after
    :func:`mome.lit.llava.normalize_answer` (lower case, punctuation and articles removed, whitespace
    collapsed): ``exact_match = hits / samples``, also per question type (``exact_match/<type>``, from the
    records' ``meta.question_types``). Generation and scoring are :func:`mome.lit.llava.answer_questions`,
    the code of ``LLaVATask.test_step``. Every answer is written to ``predictions.jsonl`` beside
    ``results.json`` (``id``, ``question``, ``question_type``, ``answer``, ``prediction``, ``hit``), in
    dataset order and without the samples Lightning's ``DistributedSampler`` repeats.

    Args:
        max_new_tokens: the longest answer generated, in tokens.
    """

    name = "vqa"
    option = "vqa"

    def __init__(self, *args: Any, max_new_tokens: int = 8, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from ..models.moe_llava import MoELLaVA

        if not isinstance(self.model, MoELLaVA):
            raise TaskConfigError(
                f"eval_task=vqa generates answers with a MoE-LLaVA model (moe_llava_*); {self.model_name} is a "
                f"{type(self.model).__name__}: use eval_task=classification, zero_shot, retrieval or linear_probe"
            )
        if self.tokenizer is None:
            raise TaskConfigError(f"eval_task=vqa: {self.model_name} has no tokenizer in its pretrained cfg")
        if int(max_new_tokens) < 1:
            raise TaskConfigError(f"eval_task.max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = int(max_new_tokens)
        self.predictions: list[dict[str, Any]] = []
        self._answered: list[dict[str, Any]] = []

    def check_data(self, datamodule_class: type) -> None:
        if not issubclass(datamodule_class, ConversationDataModule):
            raise DataConfigError(
                f"eval_task=vqa needs questions and answers, but {datamodule_class.__name__} has none: use a "
                "conversation data module (data=shapes, or data=conversation with LLaVA-JSON files)"
            )

    def dataloaders(self, datamodule: MomeDataModule, split: str, max_samples: int | None = None) -> list[DataLoader]:
        self.check_data(type(datamodule))
        return [split_loader(datamodule, split, max_samples, wrap=_QuestionSamples, collate_fn=_collate_questions)]

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._answered = []

    def evaluate_batch(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        answered = llava.answer_questions(
            self.model,
            self.tokenizer.tokenizer,
            batch["prompt_ids"],
            batch["prompt_images"],
            batch["answers"],
            self.max_new_tokens,
        )
        for position, (prediction, hit) in enumerate(answered):
            self._answered.append(
                {
                    "id": batch["id"][position],
                    "question": batch["question"][position],
                    "question_type": batch["question_types"][position],
                    "answer": batch["answers"][position],
                    "prediction": prediction,
                    "hit": bool(hit),
                }
            )

    def compute(self) -> dict[str, float]:
        indices = self.gather(torch.cat(self._indices[0]).to(self.device)).cpu()
        answered = self.gather_objects(self._answered)
        self.predictions = [answered[i] for i in indices.argsort().tolist()]
        if not self.predictions:
            raise DataConfigError("eval_task=vqa: no question was evaluated")
        metrics = {"exact_match": sum(p["hit"] for p in self.predictions) / len(self.predictions)}
        for kind in sorted({p["question_type"] for p in self.predictions if p["question_type"]}):
            hits = [p["hit"] for p in self.predictions if p["question_type"] == kind]
            metrics[f"exact_match/{kind}"] = sum(hits) / len(hits)
        return metrics

    def protocol(self) -> dict[str, Any]:
        return {
            "question": "the first question of each record",
            "decoding": "greedy",
            "max_new_tokens": self.max_new_tokens,
            "normalization": "lower case, punctuation and articles removed, whitespace collapsed",
        }

    def write(self, folder: Path) -> dict[str, Path]:
        """``results.json`` and the routing report, and ``predictions.jsonl``: one answer per line."""
        written = super().write(folder)
        path = Path(folder) / "predictions.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in self.predictions))
        written["predictions"] = path
        return written
