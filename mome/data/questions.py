"""Questions with reference answers, read from conversation records: the samples of VQA evaluation.

Each LLaVA conversation record (:mod:`mome.data.conversation`) becomes one question: its first human turn
as a generation prompt (chat template, images expanded) with the images that turn shows, and the first
answer as the reference, with the record's first question type (``meta.question_types``). Prompts differ
in length and are generated one at a time, so :func:`collate_questions` keeps per-sample lists.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from .base import DataConfigError
from .conversation import IMAGE_PLACEHOLDER, ConversationDataset, PromptedConversations

__all__ = ["QuestionSamples", "collate_questions"]


class QuestionSamples(Dataset):
    """Each conversation record's first question: ``{"id", "question" (text without image placeholders),
    "prompt_ids" [1, L], "prompt_images" [n, 3, H, W], "answers" (the reference), "question_types"}``.

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
        return {
            "id": str(sample["id"]),
            "question": question.replace(IMAGE_PLACEHOLDER, " ").strip(),
            "prompt_ids": sample["prompt_ids"],
            "prompt_images": sample["prompt_images"],
            "answers": sample["answers"],
            "question_types": sample["question_types"],
        }


def collate_questions(samples: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-sample lists (prompts differ in length and are generated one at a time)."""
    return {key: [sample[key] for sample in samples] for key in samples[0]}
