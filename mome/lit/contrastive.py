"""Image-text contrastive training (LIMoE, VLMo's dual encoder): CLIP's symmetric InfoNCE.

With unit-norm image and text features ``u_i``, ``v_j`` and a learnable temperature ``t`` (the model's
``logit_scale``, ``exp`` applied by the model as in open_clip), ``s_ij = t * u_i . v_j`` and

    L = ( CE(s, I) + CE(s^T, I) ) / 2          (Radford et al. 2021; LIMoE, Mustafa et al. 2022, eq. 1)

computed by open_clip's ``ClipLoss``, which gathers the features of every rank (with gradients) under
DDP, so the negatives are the global batch. Validation and test report the loss and, when the data
module has ``classnames`` and ``templates``, zero-shot top-1 accuracy with open_clip's
``build_zero_shot_classifier`` (the mean of the normalised template embeddings per class).
"""

from __future__ import annotations

from typing import Any

from open_clip import build_zero_shot_classifier
from open_clip.loss import ClipLoss
from torch import Tensor

from .base import MomeTask
from .classification import classification_metrics

__all__ = ["ContrastiveTask"]


class ContrastiveTask(MomeTask):
    """CLIP-style training of an open_clip-contract model: ``model(image, text) -> (u, v, t)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.zero_shot_classifier: Tensor | None = None
        self.val_metrics = self.test_metrics = None

    def setup(self, stage: str) -> None:
        self.clip_loss = ClipLoss(
            local_loss=False, gather_with_grad=True, rank=self.global_rank, world_size=self.trainer.world_size
        )
        datamodule = getattr(self.trainer, "datamodule", None)
        classnames = getattr(datamodule, "classnames", None)
        if classnames:
            self.val_metrics = classification_metrics(len(classnames), "val/zeroshot_").to(self.device)
            self.test_metrics = classification_metrics(len(classnames), "test/zeroshot_").to(self.device)

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.model(image, text)

    def _loss(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        image_features, text_features, logit_scale = self(batch["image"], batch["text"])
        loss = self.clip_loss(image_features, text_features, logit_scale)
        self.log(f"{stage}/logit_scale", logit_scale.detach(), batch_size=self._batch_size)
        return self.total_loss({"contrastive_loss": loss}, stage)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._loss(batch, "train")

    # ----------------------------------------------------------------- zero-shot evaluation
    def _build_classifier(self) -> None:
        datamodule = self.trainer.datamodule
        self.zero_shot_classifier = build_zero_shot_classifier(
            self.model,
            tokenizer=self.tokenizer,
            classnames=datamodule.classnames,
            templates=datamodule.templates,
            num_classes_per_batch=None,
            device=self.device,
        )  # [embed_dim, num_classes]

    def _zero_shot(self, batch: dict[str, Tensor], metrics: Any) -> None:
        if metrics is None or "label" not in batch:
            return
        image_features = self.model.encode_image(batch["image"], normalize=True)
        metrics.update(image_features @ self.zero_shot_classifier, batch["label"])
        self.log_dict(metrics, prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        if self.val_metrics is not None:
            self._build_classifier()

    def on_test_epoch_start(self) -> None:
        if self.test_metrics is not None:
            self._build_classifier()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._loss(batch, "val")
        self._zero_shot(batch, self.val_metrics)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._loss(batch, "test")
        self._zero_shot(batch, self.test_metrics)
