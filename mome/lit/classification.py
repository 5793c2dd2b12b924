"""Image classification (V-MoE, Soft MoE ViTs): cross-entropy plus the MoE aux losses.

``L = CE(f(x), y)`` with optional label smoothing (Szegedy et al. 2016), top-1/top-5 accuracy and mean
per-class recall from torchmetrics at validation and test.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall

from .base import MomeTask, TaskConfigError, check_number

__all__ = ["ClassificationTask", "classification_metrics"]


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1, top-5 (when there are more than 5 classes) and mean per-class recall.

    Without torchmetrics' compute groups: a collection groups metrics whose states are equal after the first
    ``update`` and then updates one state for the group, so top-1 and top-5 shared one state whenever the first
    batch could not tell them apart (a batch of one sample: top-5 read as top-1).
    """
    metrics: dict[str, Any] = {
        "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
        "mean_per_class_recall": MulticlassRecall(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


class ClassificationTask(MomeTask):
    """Supervised classification of ``batch["image"]`` into ``batch["label"]``.

    Args:
        label_smoothing: cross-entropy label smoothing.
        **kwargs: :class:`~mome.lit.base.MomeTask` arguments (``model`` must build a classifier with
            ``num_classes`` outputs).
    """

    def __init__(self, *args: Any, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_number("task.label_smoothing", label_smoothing, "a number in [0, 1]")  # else a failed first step
        self.label_smoothing = label_smoothing
        num_classes = int(getattr(self.model, "num_classes", 0))
        if num_classes < 2:
            raise ValueError(f"model {self.model_name} has num_classes={num_classes}; set model.num_classes")
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")

    def check_datamodule(self, datamodule: Any) -> None:
        """The head must have one output per class of the data (as ``mome-eval`` requires of the exported model): a
        label >= ``model.num_classes`` would stop training mid-epoch, extra outputs would never be trained."""
        classes = getattr(datamodule, "num_classes", None)
        head = int(self.model.num_classes)
        if isinstance(classes, int) and classes != head:
            raise TaskConfigError(
                f"model.num_classes={head} but the data has {classes} classes: set model.num_classes={classes}"
            )

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image)

    def _step(self, batch: dict[str, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        return self.total_loss({"task_loss": loss}, stage), logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self._step(batch, "val")[1]
        self.val_metrics.update(logits, batch["label"])
        self.log_dict(self.val_metrics, prog_bar=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self._step(batch, "test")[1]
        self.test_metrics.update(logits, batch["label"])
        self.log_dict(self.test_metrics)
