"""Contrastive training (LIMoE, VLMo's dual encoder): CLIP's symmetric InfoNCE, over two or three modalities.

With unit-norm image and text features ``u_i``, ``v_j`` and a learnable temperature ``t`` (the model's
``logit_scale``, ``exp`` applied by the model as in open_clip), ``s_ij = t * u_i . v_j`` and

    L = ( CE(s, I) + CE(s^T, I) ) / 2          (Radford et al. 2021; LIMoE, Mustafa et al. 2022, eq. 1)

computed by open_clip's ``ClipLoss``, which gathers the features of every rank (with gradients) under
DDP, so the negatives are the global batch.

A model with an audio modality (``encode_audio``, e.g. ``limoe_audio_tiny_patch8_e4``) trained on batches with
``"audio"`` (``data.task=image_text_audio``) learns from the three pairs, the sum of their symmetric InfoNCE losses

    L = L(image, text) + L(audio, text) + L(audio, image)

each logged on its own (``contrastive_image_text``, ``contrastive_audio_text``, ``contrastive_audio_image``). The
three pairs share the model's one ``logit_scale``: the three embeddings live on one unit sphere and every
evaluation compares them by the same cosine (zero-shot from any modality against the same text classifier,
retrieval between any two), so one temperature keeps the three losses on one scale and the joint space one
geometry (ImageBind, Girdhar et al. 2023, likewise binds every modality with one InfoNCE form).

Validation and test report the loss and, when the data module has ``classnames`` and ``templates``, zero-shot
top-1 accuracy with open_clip's ``build_zero_shot_classifier`` (the mean of the normalised template embeddings per
class): from the images (``zeroshot_top1``) and, for a model with audio, from the audio too (``zeroshot_audio_top1``).
"""

from __future__ import annotations

from typing import Any

from open_clip import build_zero_shot_classifier
from open_clip.loss import ClipLoss
from torch import Tensor

from .base import MomeTask, TaskConfigError
from .classification import classification_metrics

__all__ = ["CONTRASTIVE_PAIRS", "ContrastiveTask"]

#: The modality pairs a model with audio learns from (the sum of their symmetric InfoNCE losses).
CONTRASTIVE_PAIRS = (("image", "text"), ("audio", "text"), ("audio", "image"))


class ContrastiveTask(MomeTask):
    """CLIP-style training of an open_clip-contract model: ``model(image, text) -> (u, v, t)``, or with audio
    ``model(image, text, audio) -> (u, v, w, t)`` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.zero_shot_classifier: Tensor | None = None
        self.val_metrics = self.test_metrics = None
        self.val_audio_metrics = self.test_audio_metrics = None
        self.with_audio = "audio" in getattr(self.model, "modality_names", ()) and hasattr(self.model, "encode_audio")

    def check_datamodule(self, datamodule: Any) -> None:
        """A model with audio needs batches with ``"audio"``: a data module whose ``modalities`` include it."""
        if self.with_audio and "audio" not in (getattr(datamodule, "modalities", None) or ()):
            found = getattr(datamodule, "modalities", None)
            raise TaskConfigError(
                f"{self.model_name} has the audio modality and learns from image-text, audio-text and audio-image "
                f"pairs, but {type(datamodule).__name__} gives {', '.join(found) if found else 'no audio'}: "
                "use data=digits data.task=image_text_audio"
            )

    def setup(self, stage: str) -> None:
        self.clip_loss = ClipLoss(
            local_loss=False, gather_with_grad=True, rank=self.global_rank, world_size=self.trainer.world_size
        )
        datamodule = getattr(self.trainer, "datamodule", None)
        classnames = getattr(datamodule, "classnames", None)
        if classnames:
            num = len(classnames)
            self.val_metrics = classification_metrics(num, "val/zeroshot_").to(self.device)
            self.test_metrics = classification_metrics(num, "test/zeroshot_").to(self.device)
            if self.with_audio:
                self.val_audio_metrics = classification_metrics(num, "val/zeroshot_audio_").to(self.device)
                self.test_audio_metrics = classification_metrics(num, "test/zeroshot_audio_").to(self.device)

    def forward(self, image: Tensor, text: Tensor, audio: Tensor | None = None) -> tuple[Tensor, ...]:
        return self.model(image, text) if audio is None else self.model(image, text, audio)

    def _loss(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        if not self.with_audio:
            image_features, text_features, logit_scale = self(batch["image"], batch["text"])
            losses = {"contrastive_loss": self.clip_loss(image_features, text_features, logit_scale)}
        else:
            if "audio" not in batch:
                raise TaskConfigError(f"{self.model_name} has the audio modality: the batches need 'audio'")
            image, text, audio, logit_scale = self(batch["image"], batch["text"], batch["audio"])
            features = {"image": image, "text": text, "audio": audio}
            losses = {
                f"contrastive_{a}_{b}": self.clip_loss(features[a], features[b], logit_scale)
                for a, b in CONTRASTIVE_PAIRS
            }
        self.log(f"{stage}/logit_scale", logit_scale.detach(), batch_size=self._batch_size)
        return self.total_loss(losses, stage)

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

    def _zero_shot(self, batch: dict[str, Tensor], metrics: Any, audio_metrics: Any = None) -> None:
        if metrics is None or "label" not in batch:
            return
        image_features = self.model.encode_image(batch["image"], normalize=True)
        metrics.update(image_features @ self.zero_shot_classifier, batch["label"])
        self.log_dict(metrics, prog_bar=True)
        if audio_metrics is not None and "audio" in batch:
            audio_features = self.model.encode_audio(batch["audio"], normalize=True)
            audio_metrics.update(audio_features @ self.zero_shot_classifier, batch["label"])
            self.log_dict(audio_metrics, prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        if self.val_metrics is not None:
            self._build_classifier()

    def on_test_epoch_start(self) -> None:
        if self.test_metrics is not None:
            self._build_classifier()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._loss(batch, "val")
        self._zero_shot(batch, self.val_metrics, self.val_audio_metrics)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._loss(batch, "test")
        self._zero_shot(batch, self.test_metrics, self.test_audio_metrics)
