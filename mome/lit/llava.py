"""MoE-LLaVA's three-stage MoE-tuning (Lin et al. 2024, sec. 3.2) as Lightning runs, one per stage.

Each stage is its own ``mome-train`` experiment that starts from the model the previous stage exported:

1. ``stage=1`` — a dense LLaVA (``moe_layers: none``); only the projector trains (image-caption or
   VQA data);
2. ``stage=2`` — still dense, initialised from stage 1 (``init_from``); projector + the whole LLM train;
3. ``stage=3`` — the model spec is the MoE model; at the start of training the stage-2 dense model is
   loaded and sparsely upcycled into it (each chosen layer's FFN copied into every expert, routers
   random: :meth:`mome.models.moe_llava.MoELLaVA.upcycle`); only experts and routers train.

The loss is the answer-token LM loss plus the MoE load-balancing term ``0.01 * sum_l E sum_e f_e P_e``
(``mome.aux_losses``; the model's ``router_aux_loss_coef``). ``init_from`` (a mome folder or a
``mome-train`` checkpoint) is applied in ``setup("fit")``, so a checkpoint of this task reloads with
``load_from_checkpoint`` alone. Validation reports the LM loss; test also generates (greedy,
``max_new_tokens``) an answer to each record's first question and scores exact match after
:func:`normalize_answer`, overall and per question type (:func:`answer_questions`, shared with
``mome-eval eval_task=vqa``: :class:`mome.lit.VQAEvalTask`).

:class:`UniMoETask` runs Uni-MoE's three stages (Li et al. 2024, arXiv:2405.11273; :mod:`mome.models.uni_moe`)
the same way, with audio clips fed next to the images:

1. ``stage=1`` — a dense Uni-MoE (``moe_layers: none``); the image and audio connectors train
   (``task.modality``: one of them only);
2. ``stage=2`` — dense, ``init_from`` stage 1; the LLM's FFNs train, one run per modality's data (the data's
   ``modality`` field), giving that modality's expert;
3. ``stage=3`` — the MoE model; ``init_from`` lists the stage-2 models, one per expert: the first is upcycled
   (its FFN copied into every expert, routers random), then expert ``e`` takes the FFNs of the ``e``-th model
   (:meth:`mome.models.uni_moe.UniMoE.load_modality_experts`); each expert gets a LoRA (rank ``lora_r``, scaling
   ``lora_alpha / r``, ``B = 0`` so training starts from the stage-2 experts) and only the LoRAs, the routers and
   both connectors train. The loss is the answer-token LM loss (Uni-MoE adds no balancing term).
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._checkpoint import load_state_exactly
from .._factory import create_model
from .base import MomeTask, TaskConfigError, model_from_checkpoint
from .expert_parallel import forward_is_collective

__all__ = [
    "LLaVATask",
    "UniMoETask",
    "answer_questions",
    "exact_match",
    "generate_answer",
    "generate_answers",
    "normalize_answer",
]

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Answer normalisation for exact match (SQuAD v1.1's ``normalize_answer``, the article and punctuation
    steps of the VQA evaluation): lower case, ASCII punctuation removed, the articles ``a``/``an``/``the``
    removed, runs of whitespace collapsed to one space and the ends stripped (``" The  Red. "`` -> ``"red"``)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """VQA exact match: the two answers are equal after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


def left_pad(prompt_ids: Sequence[Tensor], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Prompts ``[1, L_i]`` as one left-padded batch: ``(input_ids [B, L], attention_mask [B, L])`` with
    ``L = max L_i``; row ``i`` holds ``pad_token_id`` (attention 0) in its first ``L - L_i`` positions, so every
    prompt ends at the last column, where generation appends (transformers' convention for decoder-only models)."""
    length = max(prompt.shape[-1] for prompt in prompt_ids)
    input_ids = torch.full((len(prompt_ids), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompt_ids):
        width = prompt.shape[-1]
        input_ids[row, length - width :] = prompt.reshape(-1)  # [1, L_i] -> [L_i]
        attention_mask[row, length - width :] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Tensor],
    images: Sequence[Tensor],
    max_new_tokens: int,
    media: Mapping[str, Sequence[Tensor]] | None = None,
) -> list[str]:
    """Greedy answers of a MoE-LLaVA ``model`` to a batch of prompts ``[1, L_i]``, each with its images
    ``[n_i, 3, H, W]``, in one transformers ``generate`` call: the prompts left-padded (:func:`left_pad`, the
    attention mask zero on the pads), the images concatenated in prompt order (LLaVA fills the image placeholders
    row by row). At most ``max_new_tokens`` new tokens each (a row stops at ``eos`` and is padded after it),
    decoded without special tokens by the transformers ``tokenizer``. ``media`` (a Uni-MoE ``model``): the model's
    keyword for other inputs (``"input_features"``, ``"pixel_values_videos"``) -> each prompt's clips
    ``[n_a, mel, frames]`` or videos ``[n_v, F, 3, H, W]``, concatenated in prompt order as the images
    (:func:`prompt_media` reads them from a batch).

    The answers are those of one prompt at a time (``tests/test_eval_vqa.py``) as long as no MoE layer drops a
    token: the pads are routed like any token, so under a capacity limit they take expert slots, and a batch's
    capacity ``ceil(T k c / E)`` differs from a single prompt's."""
    if not prompt_ids:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_pad(prompt_ids, pad)
    extra = {key: torch.cat([value.to(device) for value in values]) for key, values in (media or {}).items()}
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        images=torch.cat([image.to(device) for image in images]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        synced_gpus=forward_is_collective(model),  # every rank decodes as many steps
        **extra,
    )
    return tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)


def generate_answer(model: Any, tokenizer: Any, prompt_ids: Tensor, images: Tensor, max_new_tokens: int) -> str:
    """Greedy answer of a MoE-LLaVA ``model`` to one prompt ``[1, L]`` with its images ``[n, 3, H, W]``: at
    most ``max_new_tokens`` new tokens (stopping at ``eos``), decoded without special tokens by the
    transformers ``tokenizer`` (:func:`generate_answers` of a batch of one)."""
    return generate_answers(model, tokenizer, [prompt_ids], [images], max_new_tokens)[0]


def answer_questions(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Tensor],
    images: Sequence[Tensor],
    references: Sequence[str],
    max_new_tokens: int,
    media: Mapping[str, Sequence[Tensor]] | None = None,
) -> list[tuple[str, bool]]:
    """``(predicted answer, exact match)`` of each question of a batch: the greedy answers, generated together
    (:func:`generate_answers`, with the prompts' ``media`` for Uni-MoE), scored against their references with
    :func:`exact_match`."""
    if len(references) != len(prompt_ids):
        raise ValueError(f"answer_questions: {len(prompt_ids)} prompts but {len(references)} references")
    predictions = generate_answers(model, tokenizer, prompt_ids, images, max_new_tokens, media=media)
    return [(prediction, exact_match(prediction, reference)) for prediction, reference in zip(predictions, references)]


#: a test batch's per-prompt inputs besides the images -> the model keyword they go to
PROMPT_MEDIA = {"prompt_audios": "input_features", "prompt_videos": "pixel_values_videos"}


def prompt_media(batch: Mapping[str, Any]) -> dict[str, Sequence[Tensor]]:
    """The per-prompt clips and videos of a test batch, by the model keyword they go to (:func:`generate_answers`'s
    ``media``); empty for a model without them."""
    return {keyword: batch[key] for key, keyword in PROMPT_MEDIA.items() if batch.get(key) is not None}


def _load_init(path: str | Path) -> torch.nn.Module:
    path = Path(path)
    if path.is_dir():
        return create_model(f"local-dir:{path}")
    return model_from_checkpoint(path)


class LLaVATask(MomeTask):
    """LLaVA instruction tuning with MoE-LLaVA's stages.

    Args:
        stage: 1, 2 or 3 (see the module docstring).
        init_from: the previous stage's model (mome folder or ``mome-train`` checkpoint), or None.
        train_dense_ffn: stage 3 also trains the dense FFNs of the non-MoE layers (upstream's behaviour).
        max_new_tokens: answer length generated at test.
        **kwargs: :class:`~mome.lit.base.MomeTask` arguments.
    """

    def __init__(
        self,
        *args: Any,
        stage: int = 3,
        init_from: str | None = None,
        train_dense_ffn: bool = False,
        max_new_tokens: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._check_model()
        self.stage, self.init_from = stage, init_from
        self.train_dense_ffn, self.max_new_tokens = train_dense_ffn, max_new_tokens
        self._prepare_stage()
        self._configure_stage()
        self._answers: dict[str, list[float]] = defaultdict(list)

    # ------------------------------------------------------------------------------- family hooks
    def _check_model(self) -> None:
        from ..models.moe_llava import MoELLaVA
        from ..models.uni_moe import UniMoE

        if not isinstance(self.model, MoELLaVA) or isinstance(self.model, UniMoE):
            # Uni-MoE subclasses MoE-LLaVA, but its stages and its audio input are UniMoETask's
            raise TaskConfigError(f"LLaVATask needs a MoE-LLaVA model, got {type(self.model).__name__}")

    def _prepare_stage(self) -> None:
        """Change the model's structure for ``self.stage`` before its parameters are chosen (Uni-MoE: LoRA)."""

    def _configure_stage(self) -> None:
        """Choose the trainable parameters of ``self.stage`` (then ``task.peft`` restricts them to its adapters)."""
        from ..models.moe_llava import configure_stage

        try:
            configure_stage(self.model, self.stage, train_dense_ffn=self.train_dense_ffn)
        except ValueError as err:
            raise TaskConfigError(
                f"task.stage={self.stage}: {err} (model.moe_layers must be 'none' in stages 1-2)"
            ) from err
        self.restrict_to_adapters()  # task.peft: only the LoRA experts train, in any stage

    def _model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The model's media keyword arguments of a batch."""
        return {"images": batch["images"]}

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.init_from and self.trainer.ckpt_path is None:
            self._initialise_from(self.init_from)

    def _initialise_from(self, path: str) -> None:
        """Load the previous stage's weights; upcycle them when this stage's model has MoE layers."""
        previous = _load_init(path)
        if self.model.moe_layers and not previous.moe_layers:
            config = self.model.config
            previous.upcycle(
                moe_layers=self.model.moe_layers, num_experts=config.num_experts, top_k=config.num_experts_per_tok
            )
        if self.peft_cfg is None:
            load_state_exactly(self.model, previous.state_dict(), f"task.init_from={path}")
        else:  # the previous stage's weights are the frozen base of the LoRA experts
            from ..peft import load_base_state_dict

            load_base_state_dict(self.model, previous.state_dict(), f"task.init_from={path}")
        self._configure_stage()

    # ------------------------------------------------------------------------------- steps
    def _lm_loss(self, batch: dict[str, Any], split: str) -> Tensor:
        output = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            **self._model_inputs(batch),
        )
        return self.total_loss({"lm_loss": output.loss}, split)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._lm_loss(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._lm_loss(batch, "val")

    def on_test_epoch_start(self) -> None:
        self._answers = defaultdict(list)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._lm_loss(batch, "test")
        answered = answer_questions(
            self.model,
            self.tokenizer.tokenizer,
            batch["prompt_ids"],
            batch["prompt_images"],
            batch["answers"],
            self.max_new_tokens,
            prompt_media(batch),
        )
        for (_, matched), kind in zip(answered, batch["question_types"], strict=True):
            hit = float(matched)
            self._answers["all"].append(hit)
            if kind:
                self._answers[kind].append(hit)

    def on_test_epoch_end(self) -> None:
        counts = {kind: (sum(hits), len(hits)) for kind, hits in self._answers.items()}
        parts = [counts]
        if self.trainer.world_size > 1:  # one gather of every rank's counts: the ranks' question kinds differ
            parts = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, counts)
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for part in parts:
            for kind, (hits, count) in part.items():
                totals[kind][0] += hits
                totals[kind][1] += count
        for kind, (hits, count) in sorted(totals.items()):
            name = "test/exact_match" if kind == "all" else f"test/exact_match/{kind}"
            self.log(name, hits / count, rank_zero_only=True)


class UniMoETask(LLaVATask):
    """Uni-MoE's progressive training (see the module docstring): :class:`LLaVATask` with audio clips
    (``batch["audios"]``) and :func:`mome.models.uni_moe.configure_stage`'s stages.

    Args:
        stage: 1, 2 or 3.
        init_from: the previous stage's model (mome folder or ``mome-train`` checkpoint); in stage 3 a list of the
            stage-2 models, one per expert (``model.num_experts`` of them).
        modality: stage 1 only: ``"image"`` or ``"audio"`` trains that connector alone (None: both).
        lora_r / lora_alpha: stage 3's expert LoRA (:func:`mome.models.uni_moe.add_expert_lora`; upstream 8 / 16).
        max_new_tokens: answer length generated at test.
        **kwargs: :class:`~mome.lit.base.MomeTask` arguments (``peft`` must stay null: stage 3 adds its LoRA).
    """

    def __init__(
        self,
        *args: Any,
        stage: int = 1,
        init_from: str | Sequence[str] | None = None,
        modality: str | None = None,
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        max_new_tokens: int = 4,
        **kwargs: Any,
    ) -> None:
        self.modality, self.lora_r, self.lora_alpha = modality, lora_r, lora_alpha
        if init_from is not None and not isinstance(init_from, str):
            init_from = [str(path) for path in init_from]  # a Hydra ListConfig
        super().__init__(*args, stage=stage, init_from=init_from, max_new_tokens=max_new_tokens, **kwargs)

    def _check_model(self) -> None:
        from ..models.uni_moe import UniMoE

        if not isinstance(self.model, UniMoE):
            raise TaskConfigError(f"UniMoETask needs a Uni-MoE model, got {type(self.model).__name__}")
        if self.peft_cfg is not None:
            raise TaskConfigError("task.peft must be null: UniMoETask's stage 3 adds its own expert LoRA (task.lora_r)")

    def _prepare_stage(self) -> None:
        from ..models.uni_moe import add_expert_lora

        if self.stage == 3:
            if not self.model.moe_layers:
                raise TaskConfigError(
                    "task.stage=3 needs a model with MoE layers (model.moe_layers must not be 'none')"
                )
            add_expert_lora(self.model, r=self.lora_r, lora_alpha=self.lora_alpha)

    def _configure_stage(self) -> None:
        from ..models.uni_moe import configure_stage

        try:
            configure_stage(self.model, self.stage, modality=self.modality)
        except ValueError as err:
            raise TaskConfigError(
                f"task.stage={self.stage}, task.modality={self.modality}: {err} "
                "(model.moe_layers must be 'none' in stages 1-2; task.modality is for stage 1)"
            ) from err

    def _model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"images": batch["images"], "audios": batch.get("audios"), "videos": batch.get("videos")}

    def _initialise_from(self, path: str | Sequence[str]) -> None:
        """Stages 1-2: load the previous stage's model. Stage 3: upcycle the first stage-2 model, then put the
        ``e``-th one's FFNs into expert ``e`` (the stage-2 models must share every other weight)."""
        from ..peft import load_base_state_dict

        paths = [path] if isinstance(path, str) else list(path)
        source = f"task.init_from={paths}"
        if self.stage != 3 and len(paths) != 1:
            raise TaskConfigError(f"{source}: stage {self.stage} starts from one model, got {len(paths)}")
        previous = [_load_init(one) for one in paths]
        if self.stage != 3:
            load_state_exactly(self.model, previous[0].state_dict(), source)
            self._configure_stage()
            return
        config = self.model.config
        if len(previous) != config.num_experts:
            raise TaskConfigError(f"{source}: one stage-2 model per expert, model.num_experts={config.num_experts}")
        llm = "model.language_model.layers."  # keys of the LLM's FFNs: f"{llm}{i}.mlp.*"
        state = previous[0].state_dict()
        shared = {key: value for key, value in state.items() if not (key.startswith(llm) and ".mlp." in key)}
        for position, other in enumerate(previous[1:], start=1):
            state = other.state_dict()
            differing = [key for key, value in shared.items() if key not in state or not torch.equal(state[key], value)]
            if differing:
                raise TaskConfigError(
                    f"{source}: model {paths[position]} differs from {paths[0]} outside the FFNs "
                    f"({differing[0]}, ...): the stage-2 models must come from the same stage-1 model"
                )
        if previous[0].moe_layers:
            raise TaskConfigError(f"{source}: {paths[0]} has MoE layers; stage 3 starts from dense stage-2 models")
        base = _load_init(paths[0])  # upcycled in place: the dense models stay the experts' sources
        base.upcycle(moe_layers=self.model.moe_layers, num_experts=config.num_experts, top_k=config.num_experts_per_tok)
        load_base_state_dict(self.model, base.state_dict(), source)
        try:
            self.model.load_modality_experts(previous)
        except ValueError as err:
            raise TaskConfigError(f"{source}: {err}") from err
        self._configure_stage()
