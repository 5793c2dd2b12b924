"""VLMo's stagewise pre-training (Bao et al. 2022, "VLMo: Unified Vision-Language Pre-Training with
Mixture-of-Modality-Experts", sec. 2.3) as one Lightning run whose ``schedule`` switches stage by epoch:

1. ``image`` — vision pre-training: masked image modelling on the image-only path; every parameter the
   image path uses is trained (patch embedding, attention, V-FFN). VLMo uses BEiT's objective (predict
   the DALL-E dVAE token of each masked patch); that tokenizer cannot be fetched offline, so mome
   regresses the masked patches' normalised pixels instead (SimMIM, Xie et al. 2022):
   ``L_mim = mean_{masked p} |W h_p - pixels_p|_1``, with a learnable mask embedding and a linear
   head that belong to the task, not to the exported model;
2. ``text`` — language pre-training: masked language modelling on the text-only path with the
   attention, the V-FFN and everything the image path uses frozen, as in the paper: only the text
   embeddings, the L-FFN (its slice of the stacked multiway experts; in a VL-MoE, also the text tokens' sparse
   T-MoE layers, ``.mlp.sparse.text.``, while the V-MoE layers stay frozen) and the MLM head train;
3. ``image_text`` — vision-language pre-training, everything trained, with
   ``L = L_itc + L_itm + L_mlm``: image-text contrastive (CLIP's InfoNCE on the dual-encoder path),
   image-text matching on the fusion path with hard negatives (for each image a text, and for each
   text an image, sampled from the in-batch contrastive similarities, ``p ~ softmax(s)`` with the
   positives and same-class pairs excluded, VLMo's ITM recipe), and MLM on the fusion path.

Each stage has its own learning-rate schedule, ``task.scheduler``'s warm-up then cosine decay over the stage's steps
(:meth:`VLMoTask.lr_multiplier`), as upstream runs each stage as a pre-training of its own.
Text masking uses transformers' ``DataCollatorForLanguageModeling`` (15%, BERT's 80/10/10 rule).
A stage runs the model several times per step (image, text, fusion paths); each pass's MoE aux losses
(a VL-MoE's sparse experts) are read after it and summed over the passes, ``L_aux = sum_pass sum_l aux_l``,
since every pass records its own, replacing the previous pass's.
Validation and test report the losses of the current stage and zero-shot top-1 of the dual encoder.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from ..layers.expert_parallel import ShardedExperts
from ..layers.moe import aux_losses
from .base import TaskConfigError, cosine_with_warmup, warmup_steps
from .contrastive import ContrastiveTask

__all__ = ["VLMO_STAGES", "VLMoTask"]

VLMO_STAGES = ("image", "text", "image_text")
IMAGE, TEXT = 0, 1  # the multiway experts' modality slices (mome.models.vlmo)
# Text stage: parameters trained (the rest is frozen, as in VLMo sec. 2.3).
_TEXT_STAGE_TRAINABLE = ("text_embeddings.", "mlm_score.")
_TEXT_SPARSE_EXPERTS = ".mlp.sparse.text."  # VL-MoE's T-MoE layers (MultiwayFFN.sparse["text"]) train too
_MULTIWAY_STACKED = (".mlp.norm.", ".mlp.moe.experts.")  # [modality, ...] stacks: train only the TEXT slice


class VLMoTask(ContrastiveTask):
    """VLMo pre-training with a stage schedule.

    Args:
        schedule: ``[{"stage": "image"|"text"|"image_text", "epochs": int}, ...]``; the last stage runs
            to the end of training (its ``epochs`` may be omitted).
        mlm_probability: share of text tokens masked for MLM.
        mim_mask_ratio: share of image patches masked in the image stage.
        **kwargs: :class:`~mome.lit.contrastive.ContrastiveTask` arguments.
    """

    def __init__(
        self,
        *args: Any,
        schedule: Sequence[Mapping[str, Any]] = ({"stage": "image_text"},),
        mlm_probability: float = 0.15,
        mim_mask_ratio: float = 0.4,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.schedule = [dict(entry) for entry in schedule]
        for index, entry in enumerate(self.schedule):
            if entry.get("stage") not in VLMO_STAGES:
                raise TaskConfigError(f"task.schedule[{index}].stage must be one of {VLMO_STAGES}, got {entry}")
            if index < len(self.schedule) - 1 and int(entry.get("epochs") or 0) < 1:
                raise TaskConfigError(f"task.schedule[{index}].epochs must be >= 1 (only the last may be open)")
        if not hasattr(self.model, "mlm_logits"):
            raise TaskConfigError(f"VLMoTask needs a VLMo model, got {type(self.model).__name__}")
        self.mlm_probability, self.mim_mask_ratio = mlm_probability, mim_mask_ratio
        dim, patch = self.model.embed_dim, self.model.patch_embed.patch_size
        self.mask_embedding = nn.Parameter(torch.zeros(dim))
        self.mim_head = nn.Linear(dim, patch[0] * patch[1] * 3)
        nn.init.trunc_normal_(self.mask_embedding, std=0.02)
        self._frozen_slices: dict[str, Tensor] = {}
        self._collator: Any = None
        self._pass_aux: dict[str, Tensor] = {}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if isinstance(self.trainer.strategy, DDPStrategy):  # ddp, ddp_spawn, ddp_ep: before DDP wraps the task
            # Every stage leaves parameters without a gradient (the image stage the text path, the text stage the
            # frozen image path, the other stages the MIM head): DDP must look for them at each step.
            self.trainer.strategy._ddp_kwargs["find_unused_parameters"] = True

    def _create_optimizer(self) -> torch.optim.Optimizer:
        """The model's optimiser plus the task's own MIM parameters (``mim_head``, ``mask_embedding``): they live on
        the task, not the model, so the model's optimiser alone would leave them at their random init. The head's
        weight gets ``task.optimizer.weight_decay``; its bias and the mask embedding none (as timm treats 1-d
        parameters)."""
        optimizer = super()._create_optimizer()
        if not hasattr(self, "mim_head"):  # the base task's config check at construction, before the MIM head exists
            return optimizer
        decay = float(self.optimizer_cfg.get("weight_decay", 0.0))
        optimizer.add_param_group({"params": [self.mim_head.weight], "weight_decay": decay})
        optimizer.add_param_group({"params": [self.mim_head.bias, self.mask_embedding], "weight_decay": 0.0})
        return optimizer

    def lr_multiplier(self, sched: Mapping[str, Any]) -> Callable[[int], float]:
        """Each stage its own schedule, as upstream runs each stage as a pre-training of its own (its config's
        ``warmup_steps = 0.1`` of that run): for a step ``t`` in stage ``s``, which spans ``[a_s, b_s)``,
        ``lr(t) = lr * cosine_with_warmup(t - a_s, b_s - a_s, warmup_s, min_lr_ratio)``. With one schedule over the
        whole run the image-text stage would start near the peak rate with ITC heads no earlier stage trained and
        decay while ITC is still on its plateau at ln(batch) (docs/vl_moe.md).
        ``warmup_steps``/``warmup_fraction`` and ``min_lr_ratio`` apply to every stage; a run whose epoch length is
        unknown (an iterable without a length) keeps the one schedule."""
        total = int(self.trainer.estimated_stepping_batches)
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            return super().lr_multiplier(sched)
        per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
        starts = [0]
        for entry in self.schedule[:-1]:
            starts.append(min(total, starts[-1] + int(entry["epochs"]) * per_epoch))
        spans = [(start, end) for start, end in zip(starts, [*starts[1:], total]) if end > start]
        ratio = float(sched.get("min_lr_ratio", 0.0))
        warmups = [warmup_steps(sched, end - start) for start, end in spans]

        def multiplier(step: int) -> float:
            index = max(0, bisect.bisect_right([start for start, _ in spans], step) - 1)
            start, end = spans[index]
            return cosine_with_warmup(step - start, end - start, warmups[index], ratio)

        return multiplier

    def compile_targets(self) -> list[nn.Module]:
        """``task.compile`` compiles every block: the stages train through ``encode_image``, ``encode_text``,
        ``mlm_logits`` and ``itm_logits``, not the model's forward, and each of those runs the blocks."""
        return list(self.model.blocks)

    # ------------------------------------------------------------------------------- stages
    def stage_at(self, epoch: int) -> str:
        """The stage the schedule runs at ``epoch``."""
        start = 0
        for entry in self.schedule[:-1]:
            start += int(entry["epochs"])
            if epoch < start:
                return entry["stage"]
        return self.schedule[-1]["stage"]

    @property
    def stage(self) -> str:
        return self.stage_at(self.current_epoch if self._trainer is not None else 0)

    def on_train_epoch_start(self) -> None:
        self._freeze_for(self.stage)
        self.log("train/stage", float(VLMO_STAGES.index(self.stage)))

    def _freeze_for(self, stage: str) -> None:
        self._frozen_slices = {}
        for name, param in self.model.named_parameters():
            if stage != "text":
                param.requires_grad_(True)
            elif any(part in name for part in _MULTIWAY_STACKED):
                param.requires_grad_(True)  # the TEXT slice trains; the IMAGE slice is restored each step
                row = self._image_row(name, param)
                if row is not None:  # on this rank
                    self._frozen_slices[name] = row[0][row[1]].clone()
            else:
                param.requires_grad_(name.startswith(_TEXT_STAGE_TRAINABLE) or _TEXT_SPARSE_EXPERTS in name)
        self.restrict_to_adapters()  # task.peft: only the LoRA experts train, in every stage

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._frozen_slices:  # undo the optimiser's step (momentum, weight decay) on the frozen V-FFN slices
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in self._frozen_slices.items():
                    local, index = self._image_row(name, params[name])
                    local[index] = value

    def _image_row(self, name: str, param: Tensor) -> tuple[Tensor, int] | None:
        """This rank's tensor holding the IMAGE row of the ``[modality, ...]`` stack ``name`` (a view: writing
        it writes the parameter) and the row's index in it; None where the row lives on another rank: experts
        sharded by expert parallelism (``trainer=ddp_ep``/``fsdp_ep``: rank ``r`` holds the global experts from
        ``expert_offset``), or an FSDP2 ``DTensor`` sharded along dim 0."""
        owner = self.model.get_submodule(name.rpartition(".")[0])
        start = owner.expert_offset if isinstance(owner, ShardedExperts) else 0
        local = param.detach()
        if isinstance(param, DTensor):
            local = local.to_local()
            if any(isinstance(p, Shard) for p in param.placements):
                if param.placements != (Shard(0),):
                    raise NotImplementedError(f"{name}: sharded as {param.placements}, not along dim 0 on one mesh")
                # FSDP2 shards dim 0 as torch.chunk: rank r holds rows [r c, (r + 1) c), c = ceil(n / W)
                mesh = param.device_mesh
                start = mesh.get_local_rank() * -(-param.shape[0] // mesh.size())
        index = IMAGE - start
        return (local, index) if 0 <= index < local.shape[0] else None

    # ------------------------------------------------------------------------------- losses
    def _masked_text(self, text: Tensor) -> tuple[Tensor, Tensor]:
        if self._collator is None:
            from transformers import DataCollatorForLanguageModeling

            self._collator = DataCollatorForLanguageModeling(
                self.tokenizer.tokenizer, mlm=True, mlm_probability=self.mlm_probability, return_tensors="pt"
            )
        special = torch.tensor(
            [self.tokenizer.tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True) for row in text],
            dtype=torch.bool,
        )
        masked, labels = self._collator.torch_mask_tokens(text.cpu().clone(), special_tokens_mask=special)
        return masked.to(text.device), labels.to(text.device)

    def _mlm_loss(self, text: Tensor, image: Tensor | None) -> Tensor:
        masked, labels = self._masked_text(text)
        logits = self.model.mlm_logits(masked, image=image, text_mask=text != self.model.pad_token_id)
        self._gather_aux()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    def _mim_loss(self, image: Tensor) -> Tensor:
        batch, num_patches = image.shape[0], self.model.patch_embed.num_patches
        noise = torch.rand(batch, num_patches, device=image.device)
        num_masked = max(1, round(self.mim_mask_ratio * num_patches))
        patch_mask = noise.argsort(dim=1).argsort(dim=1) < num_masked  # [B, P], exactly num_masked per image
        tokens = self.model.forward_image(image, patch_mask=patch_mask, mask_embedding=self.mask_embedding)
        self._gather_aux()
        prediction = self.mim_head(tokens[:, 1:])  # [B, P, p*p*3]
        ph, pw = self.model.patch_embed.patch_size
        grid_h, grid_w = self.model.patch_embed.grid_size
        # [B, 3, H, W] -> [B, 3, gh, ph, gw, pw] -> [B, gh, gw, ph, pw, 3] -> [B, P, ph*pw*3]
        target = image.reshape(batch, 3, grid_h, ph, grid_w, pw).permute(0, 2, 4, 3, 5, 1)
        target = target.reshape(batch, -1, ph * pw * 3)
        return (prediction - target).abs()[patch_mask].mean()

    def _itm_loss(self, batch: dict[str, Tensor], image_features: Tensor, text_features: Tensor) -> Tensor:
        image, text = batch["image"], batch["text"]
        size = image.shape[0]
        with torch.no_grad():
            similarity = image_features @ text_features.T  # [B, B]
            excluded = torch.eye(size, dtype=torch.bool, device=image.device)
            if "label" in batch:  # captions of the same class are positives too
                excluded |= batch["label"][:, None] == batch["label"][None, :]
            weights = similarity.masked_fill(excluded, float("-inf")).softmax(dim=1).nan_to_num(0.0)
            weights_t = similarity.T.masked_fill(excluded, float("-inf")).softmax(dim=1).nan_to_num(0.0)
            has_negative = ~excluded.all(dim=1)
            if not bool(has_negative.any()):
                return image_features.new_zeros(())
            rows = has_negative.nonzero().squeeze(1)
            negative_text = torch.multinomial(weights[rows], 1).squeeze(1)  # [R]
            negative_image = torch.multinomial(weights_t[rows], 1).squeeze(1)  # [R]
        images = torch.cat([image, image[rows], image[negative_image]])
        texts = torch.cat([text, text[negative_text], text[rows]])
        labels = torch.cat([torch.ones(size), torch.zeros(2 * rows.numel())]).long().to(image.device)
        logits = self.model.itm_logits(images, texts, text_mask=texts != self.model.pad_token_id)
        self._gather_aux()
        return F.cross_entropy(logits, labels)

    def stage_losses(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        """The loss terms of ``stage`` on ``batch``."""
        if stage == "image":
            return {"mim_loss": self._mim_loss(batch["image"])}
        if stage == "text":
            return {"mlm_loss": self._mlm_loss(batch["text"], None)}
        text_mask = batch["text"] != self.model.pad_token_id
        image_features = self.model.encode_image(batch["image"], normalize=True)
        self._gather_aux()
        text_features = self.model.encode_text(batch["text"], normalize=True, text_mask=text_mask)
        self._gather_aux()
        return {
            "itc_loss": self.clip_loss(image_features, text_features, self.model.logit_scale.exp()),
            "itm_loss": self._itm_loss(batch, image_features, text_features),
            "mlm_loss": self._mlm_loss(batch["text"], batch["image"]),
        }

    def _gather_aux(self) -> None:
        """Add the aux losses the model's last pass recorded to this step's (and clear the records)."""
        for name, value in aux_losses(self.model).items():
            self._pass_aux[name] = self._pass_aux[name] + value if name in self._pass_aux else value

    def step_aux_losses(self) -> dict[str, Tensor]:
        """The aux losses of every pass since the last call, summed by name (then forgotten)."""
        self._gather_aux()
        aux, self._pass_aux = self._pass_aux, {}
        return aux

    def _stage_total(self, batch: dict[str, Tensor], stage: str, split: str) -> Tensor:
        self._pass_aux = {}
        losses = self.stage_losses(batch, stage)
        return self.total_loss(losses, split, aux=self.step_aux_losses())

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._stage_total(batch, self.stage, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._stage_total(batch, self.stage, "val")
        self._zero_shot(batch, self.val_metrics)
        aux_losses(self.model)  # the zero-shot passes' records train nothing

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._stage_total(batch, "image_text", "test")
        self._zero_shot(batch, self.test_metrics)
        aux_losses(self.model)
