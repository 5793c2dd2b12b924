"""Questions with reference answers, read from conversation records: the samples of VQA evaluation.

Each LLaVA conversation record (:mod:`mome.data.conversation`) becomes one question: its first human turn
as a generation prompt (chat template, images expanded) with the images that turn shows, and the first
answer as the reference, with the record's first question type (``meta.question_types``). Prompts differ
in length and are generated one at a time, so :func:`collate_questions` keeps per-sample lists.

:class:`ProcessorQuestions` gives the same questions to a model that brings its own processor (transformers'
VLMs): the first human turn as chat content in transformers' format, with its PIL images, for the processor's
chat template and image handling.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from .base import DataConfigError
from .conversation import (
    AUDIO_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    ConversationDataset,
    PromptedConversations,
    first_question_type,
)

__all__ = ["ProcessorQuestions", "QuestionSamples", "collate_questions"]


class QuestionSamples(Dataset):
    """Each conversation record's first question: ``{"id", "question" (text without image and audio placeholders),
    "prompt_ids" [1, L], "prompt_images" [n, 3, H, W], "answers" (the reference), "question_types"}``, and
    ``"prompt_audios" [n_a, mel, frames]`` (the clips of the question's ``<audio>`` placeholders) when the data is
    bound to an audio model (Uni-MoE), ``"prompt_videos" [n_v, F, 3, H, W]`` (its ``<video>`` placeholders' videos)
    when bound to a video model.

    Raises:
        DataConfigError: ``dataset`` does not hold conversation records.
    """

    def __init__(self, dataset: Dataset) -> None:
        if not isinstance(dataset, ConversationDataset):
            raise DataConfigError(f"eval_task=vqa needs conversation records, got {type(dataset).__name__}")
        self.prompts = PromptedConversations(dataset)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.prompts[index]
        question = self.prompts.dataset.turns[index][0]["value"]
        text = question.replace(IMAGE_PLACEHOLDER, " ").replace(AUDIO_PLACEHOLDER, " ").replace(VIDEO_PLACEHOLDER, " ")
        return {
            "id": str(sample["id"]),
            "question": " ".join(text.split()),
            "prompt_ids": sample["prompt_ids"],
            "prompt_images": sample["prompt_images"],
            **{key: sample[key] for key in ("prompt_audios", "prompt_videos") if key in sample},
            "answers": sample["answers"],
            "question_types": sample["question_types"],
        }


class ProcessorQuestions(Dataset):
    """Each conversation record's first question for a model with its own processor: ``{"id", "question" (text
    without image placeholders), "content" (the turn as transformers' chat content: ``{"type": "image"}`` where
    each ``<image>`` stands and ``{"type": "text", "text": ...}`` for the text between), "images" (the turn's PIL
    images, in order), "answers" (the reference), "question_types"}``.

    Raises:
        DataConfigError: ``dataset`` does not hold raw conversation records (bound with ``bind_raw``).
    """

    def __init__(self, dataset: Dataset) -> None:
        if not isinstance(dataset, ConversationDataset) or dataset.tokenizer is not None:
            raise DataConfigError(
                f"a processor's questions need raw conversation records (ConversationDataModule.bind_raw), got "
                f"{type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        turns = self.dataset.turns[index]
        question = turns[0]["value"]
        content: list[dict[str, str]] = []
        for position, text in enumerate(question.split(IMAGE_PLACEHOLDER)):
            if position:
                content.append({"type": "image"})
            if text.strip():
                content.append({"type": "text", "text": text.strip()})
        return {
            "id": str(sample["id"]),
            "question": question.replace(IMAGE_PLACEHOLDER, " ").strip(),
            "content": content,
            "images": sample["images"][: question.count(IMAGE_PLACEHOLDER)],
            "answers": turns[1]["value"],
            "question_types": first_question_type(self.dataset.records[index]),
        }


def collate_questions(samples: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-sample lists (prompts differ in length and are generated one at a time)."""
    return {key: [sample[key] for sample in samples] for key in samples[0]}
