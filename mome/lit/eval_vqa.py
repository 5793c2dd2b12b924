"""VQA evaluation of MoE-LLaVA and Uni-MoE models and transformers' MoE VLMs (``mome-eval eval_task=vqa``):
:class:`VQAEvalTask`.

Its samples are :class:`mome.data.questions.QuestionSamples` (each conversation record's first question and
reference answer), or for a transformers MoE VLM (:mod:`mome.models.hf_moe_vlm`) that brings its own processor
:class:`mome.data.questions.ProcessorQuestions`; the DDP de-duplication, routing report and results record are
those of the base class, :class:`mome.lit.eval_tasks.EvaluationTask`.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data.base import DataConfigError, MomeDataModule
from ..data.conversation import ConversationDataModule
from ..data.questions import ProcessorQuestions, QuestionSamples, collate_questions
from . import llava
from .base import TaskConfigError
from .eval_tasks import EvaluationTask, processor_of, split_loader

__all__ = ["VQAEvalTask"]


class VQAEvalTask(EvaluationTask):
    """VQA exact match of a MoE-LLaVA model on question-answer conversations (e.g. ``data=shapes``), or of a Uni-MoE
    model (:mod:`mome.models.uni_moe`, a MoE-LLaVA with audio) on questions about images, audio clips or both
    (``data=digits_conversation``: per kind ``exact_match/image``, ``exact_match/audio``, ``exact_match/both``).

    For each record the first question is put in the chat template (``encode_prompt``, with its images),
    a greedy answer of at most ``max_new_tokens`` tokens is generated and compared with the reference after
    :func:`mome.lit.llava.normalize_answer` (lower case, punctuation and articles removed, whitespace
    collapsed): ``exact_match = hits / samples``, also per question type (``exact_match/<type>``, from the
    records' ``meta.question_types``). A Uni-MoE prompt's clips (``prompt_audios``) and videos
    (``prompt_videos``) go to ``generate`` with its images. Generation and scoring are
    :func:`mome.lit.llava.answer_questions`, the code of ``LLaVATask.test_step``: with ``routing_report=false`` and
    the default dropless evaluation (``eval_capacity``), the questions of a batch (``data.eval_batch_size``) are
    answered by one left-padded ``generate`` call (:func:`mome.lit.llava.generate_answers`), whose routing is not
    counted (its pad tokens are routed too); otherwise one at a time (a capacity limit would make a batch's
    answers depend on its other prompts). Every answer is written to ``predictions.jsonl`` beside
    ``results.json`` (``id``, ``question``, ``question_type``, ``answer``, ``prediction``, ``hit``), in
    dataset order and without the samples Lightning's ``DistributedSampler`` repeats. The routing report names
    the modality of every routed token (:meth:`~mome.lit.routing_report.RoutingRecorder.token_modalities`): a
    prompt's image (and video) placeholders are image tokens, a Uni-MoE prompt's audio placeholders audio tokens, its
    other ids and the generated tokens text.

    A transformers MoE VLM (:mod:`mome.models.hf_moe_vlm`: Qwen3-VL-MoE, ERNIE-4.5-VL, GLM-4.5V, Llama 4, Aria,
    Qwen3-Omni) answers through its family's processor, the one saved beside its weights
    (:func:`~mome.models.hf_moe_vlm.folder_processor`: a Hub snapshot loaded with ``model=hf-hub:ORG/REPO``, a
    ``save_pretrained`` folder loaded with ``model=local-dir:FOLDER``): the question as a user turn of its chat
    template with the generation prompt, the images through its image processor, greedy transformers ``generate``;
    with ``routing_report=false`` the questions of a batch (``data.eval_batch_size``) in one left-padded call
    (:func:`~mome.models.hf_moe_vlm.generate_answers`, the answers those of one question at a time), otherwise one
    question at a time (:func:`~mome.models.hf_moe_vlm.generate_answer`; the pads would be routed and counted); scored
    and written as above. The
    routing report counts its routers (:class:`~mome.lit.routing_report.RoutingRecorder`) with their modality
    (image, text, ...); it has no patch maps, and no ``cost`` is recorded (``mome._flops`` counts mome's MoE
    layers, not these models' experts).

    Args:
        max_new_tokens: the longest answer generated, in tokens.
        top_k, disabled_experts: a transformers MoE VLM only: the routing controls while evaluating
            (:meth:`~mome.lit.eval_tasks.EvaluationTask.set_routing_controls`).
    """

    name = "vqa"
    option = "vqa"

    def __init__(
        self,
        *args: Any,
        max_new_tokens: int = 8,
        top_k: int | None = None,
        disabled_experts: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        from ..models import hf_moe_vlm
        from ..models.moe_llava import MoELLaVA

        self.processor: Any = None  # a transformers MoE VLM's own processor
        if hf_moe_vlm.is_hf_moe_vlm(self.model):
            self.processor = processor_of(self.model, self.model_name, "vqa")
        elif not isinstance(self.model, MoELLaVA):
            raise TaskConfigError(
                f"eval_task=vqa generates answers with a MoE-LLaVA model (moe_llava_*) or a transformers MoE VLM "
                f"with its processor; {self.model_name} is a {type(self.model).__name__}: use "
                "eval_task=classification, zero_shot, retrieval or linear_probe"
            )
        elif self.tokenizer is None:
            raise TaskConfigError(f"eval_task=vqa: {self.model_name} has no tokenizer in its pretrained cfg")
        if int(max_new_tokens) < 1:
            raise TaskConfigError(f"eval_task.max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = int(max_new_tokens)
        self.set_routing_controls(top_k, disabled_experts)
        self.predictions: list[dict[str, Any]] = []
        self._answered: list[dict[str, Any]] = []

    def check_data(self, datamodule_class: type) -> None:
        if not issubclass(datamodule_class, ConversationDataModule):
            raise DataConfigError(
                f"eval_task=vqa needs questions and answers, but {datamodule_class.__name__} has none: use a "
                "conversation data module (data=shapes, or data=conversation with LLaVA-JSON files)"
            )

    def bind_data(self, datamodule: MomeDataModule) -> None:
        """A model with its own processor gets raw records (``bind_raw``); a MoE-LLaVA the tokenised ones."""
        if self.processor is not None and isinstance(datamodule, ConversationDataModule):
            datamodule.bind_raw()
        else:
            super().bind_data(datamodule)

    def dataloaders(self, datamodule: MomeDataModule, split: str, max_samples: int | None = None) -> list[DataLoader]:
        self.check_data(type(datamodule))
        wrap = ProcessorQuestions if self.processor is not None else QuestionSamples
        return [split_loader(datamodule, split, max_samples, wrap=wrap, collate_fn=collate_questions)]

    def on_test_start(self) -> None:
        if self.processor is not None:
            self.measure_cost = False  # mome._flops would count a transformers model's experts as dense weights
        super().on_test_start()

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._answered = []

    def evaluate_batch(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        if self.processor is not None:
            answered = self._answer_with_processor(batch)
        else:
            answered = self._answer_llava(batch)
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

    def _answer_with_processor(self, batch: dict[str, Any]) -> list[tuple[str, bool]]:
        """A transformers MoE VLM's answers through its processor: with ``routing_report=false`` the batch's questions
        in one left-padded ``generate`` call (its routing, pads included, not counted), else one at a time."""
        from ..models.hf_moe_vlm import generate_answer, generate_answers

        contents, images, references = batch["content"], batch["images"], batch["answers"]
        if not self.routing_report:
            with self._routing_paused():
                predictions = generate_answers(self.model, self.processor, contents, images, self.max_new_tokens)
        else:
            predictions = [
                generate_answer(self.model, self.processor, content, turn_images, self.max_new_tokens)
                for content, turn_images in zip(contents, images, strict=True)
            ]
        return [(p, llava.exact_match(p, r)) for p, r in zip(predictions, references, strict=True)]

    def _answer_llava(self, batch: dict[str, Any]) -> list[tuple[str, bool]]:
        prompts, images, answers = batch["prompt_ids"], batch["prompt_images"], batch["answers"]
        media = llava.prompt_media(batch)  # a Uni-MoE's clips [n_a, mel, frames] and videos [n_v, F, 3, H, W]
        if not self.routing_report and self.eval_capacity.value == "dropless":
            # the whole batch in one left-padded generate call; dropless, the pad tokens routed with it change no
            # other token's experts, and its routing is not counted (the pads would be)
            with self._routing_paused():
                answered = llava.answer_questions(
                    self.model, self.tokenizer.tokenizer, prompts, images, answers, self.max_new_tokens, media
                )
        else:  # one prompt at a time: a batch's pad tokens would be routed and counted in the report
            answered = []
            indices = self._batch_indices
            for position, (prompt, prompt_images) in enumerate(zip(prompts, images, strict=True)):
                self._batch_indices = None if indices is None else indices[position].repeat(prompt_images.shape[0])
                with self._llava_patch_capture(prompt, prompt_images), self._prompt_modalities(prompt):
                    answered += llava.answer_questions(
                        self.model,
                        self.tokenizer.tokenizer,
                        [prompt],
                        [prompt_images],
                        [answers[position]],
                        self.max_new_tokens,
                        {keyword: [values[position]] for keyword, values in media.items()},
                    )
            self._batch_indices = indices
        return answered

    def _prompt_modalities(self, prompt: torch.Tensor) -> Any:
        """The routing report's modality of each token routed while answering ``prompt [1, L]``: the prompt's
        tokens by their placeholder ids (:meth:`~mome.models.moe_llava.MoELLaVA.token_modality_ids`: image, text,
        and audio for Uni-MoE), the generated ones text."""
        if self._recorder is None:
            return nullcontext()
        modality_ids = self.model.token_modality_ids(prompt).reshape(-1)  # [1, L] -> [L]
        text = self.model.modality_names.index("text")
        return self._recorder.token_modalities(modality_ids, otherwise=text)

    def _llava_patch_capture(self, prompt: torch.Tensor, images: torch.Tensor) -> Any:
        """The patch maps of a prompt's images: image ``j``'s patches are the ``j``-th run of ``H_p W_p``
        placeholder ids (``config.image_token_id``) of ``prompt [1, L]``, row-major over the vision tower's
        grid (its CLS token is not spliced in: ``vision_feature_select_strategy="default"``)."""
        config = self.model.config
        vision = config.vision_config
        token_id = getattr(config, "image_token_id", None)
        token_id = getattr(config, "image_token_index", None) if token_id is None else token_id
        side = vision.image_size // vision.patch_size
        positions = (prompt.reshape(-1) == token_id).nonzero().reshape(-1)  # [n * H_p * W_p]
        if (
            token_id is None
            or getattr(config, "vision_feature_select_strategy", "default") != "default"
            or images.ndim != 4
            or not images.shape[0]  # an audio-only question (Uni-MoE) has no image
            or positions.numel() != images.shape[0] * side * side
        ):
            return nullcontext()
        return self._patch_capture(images, (side, side), positions.view(images.shape[0], -1), prompt.numel())

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
        prompt = "the family's processor: its chat template with the generation prompt, its image processing"
        return {
            "question": "the first question of each record",
            "prompt": prompt if self.processor is not None else "MoE-LLaVA's chat template (USER: ... ASSISTANT:)",
            "decoding": "greedy",
            "max_new_tokens": self.max_new_tokens,
            **self.routing_controls(),
            "normalization": "lower case, punctuation and articles removed, whitespace collapsed",
        }

    def write(self, folder: Path) -> dict[str, Path]:
        """``results.json`` and the routing report, and ``predictions.jsonl``: one answer per line."""
        written = super().write(folder)
        path = Path(folder) / "predictions.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in self.predictions))
        written["predictions"] = path
        return written
