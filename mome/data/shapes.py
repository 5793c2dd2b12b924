"""Synthetic shapes visual question answering, drawn with PIL, in the LLaVA conversation format.

Each image (white background) shows ``n in {1, 2, 3}`` shapes of one kind (circle, square, triangle)
and one colour (red, green, blue, yellow), in distinct horizontal cells (left, middle, right) with a
random size and vertical jitter. Questions come from templates, answers are single words:

=============  ===============================  ============================  ===============
question type  example                           answers                       chance accuracy
=============  ===============================  ============================  ===============
``colour``     "What colour is the shape?"       red, green, blue, yellow      1/4
``shape``      "Which shape is shown?"           circle, square, triangle      1/3
``count``      "How many shapes are there?"      one, two, three               1/3
``position``   "Where is the circle?"            left, middle, right           1/3
=============  ===============================  ============================  ===============

Attributes are drawn uniformly, so the chance accuracy of a question type is 1 / (number of its
answers) (:data:`CHANCE_ACCURACY`); ``position`` is only asked of single-shape images. Everything is
deterministic given the seed. :func:`shapes_records` yields records in memory (the image is a PIL
image); :func:`write_shapes_dataset` writes a folder readable by :mod:`mome.data.conversation`::

    root/images/{split}/{id}.png
    root/{train,val,test}.json   # [{"id", "image": "images/<split>/<id>.png", "conversations": [...], "meta"}]

``meta`` holds ``{"question_types": [...], "answers": [...]}`` for per-type evaluation.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

__all__ = [
    "ANSWERS",
    "CHANCE_ACCURACY",
    "COLOURS",
    "QUESTION_TYPES",
    "SHAPES",
    "draw_shapes",
    "shapes_records",
    "vocabulary",
    "write_shapes_dataset",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "middle", "right")
COUNT_WORDS = ("one", "two", "three")
QUESTION_TYPES = ("colour", "shape", "count", "position")
#: The possible answers of each question type.
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "position": POSITIONS,
}
#: Accuracy of a uniform guess (attributes are drawn uniformly): 1 / number of answers.
CHANCE_ACCURACY: dict[str, float] = {kind: 1.0 / len(answers) for kind, answers in ANSWERS.items()}
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "What colour are the shapes?"),  # singular / plural
    "shape": ("Which shape is shown?", "What shape is in the image?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?"),
    "position": ("Where is the {shape}?", "Where is the {shape} in the image?"),
}


def draw_shapes(shape: str, colour: str, cells: list[int], rng: random.Random, image_size: int = 32) -> Image.Image:
    """Draw ``len(cells)`` shapes of one kind and colour; ``cells`` are horizontal thirds (0 left, 2 right)."""
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cell_width = image_size / 3
    for cell in cells:
        size = rng.uniform(0.55, 0.85) * cell_width  # side / diameter in pixels
        cx = (cell + 0.5) * cell_width
        cy = rng.uniform(size / 2 + 1, image_size - size / 2 - 1)
        box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image


def _question(kind: str, shape: str, count: int, rng: random.Random) -> str:
    """A question of type ``kind`` from its templates (the colour question agrees in number with ``count``)."""
    templates = _TEMPLATES[kind]
    if kind == "colour":
        return templates[0 if count == 1 else 1]
    return rng.choice(templates).format(shape=shape)


def vocabulary() -> list[str]:
    """Every word and punctuation mark of the set's questions (each template with each shape) and answers, split
    as a word-level tokenizer's whitespace-and-punctuation pre-tokenizer splits text (``\\w+|[^\\w\\s]+``), in
    first-seen order: the vocabulary of a tiny model's tokenizer (``mome.models.hf_moe_vlm.tiny_processor``)."""
    texts = [template.format(shape=shape) for kind in _TEMPLATES.values() for template in kind for shape in SHAPES]
    texts += [answer for answers in ANSWERS.values() for answer in answers]
    return list(dict.fromkeys(word for text in texts for word in re.findall(r"\w+|[^\w\s]+", text)))


def shapes_records(
    num_samples: int,
    seed: int = 0,
    *,
    image_size: int = 32,
    turns: int = 1,
    question_types: tuple[str, ...] = QUESTION_TYPES,
    id_prefix: str = "shapes",
) -> Iterator[dict[str, Any]]:
    """Yield ``num_samples`` LLaVA-format records with in-memory images, deterministic given ``seed``.

    Args:
        num_samples: records to yield.
        seed: seed of a private ``random.Random`` (the global RNGs are untouched).
        image_size: image side in pixels.
        turns: question-answer rounds per image (distinct question types; fewer if the image allows
            fewer, e.g. ``position`` needs a single shape). The first human turn starts with ``<image>\\n``.
        question_types: the types to ask, a subset of :data:`QUESTION_TYPES`.
        id_prefix: record ids are ``f"{id_prefix}-{index:06d}"``.

    Each record is ``{"id", "image": PIL.Image, "conversations": [{"from": "human"|"gpt", "value"}],
    "meta": {"question_types", "answers", "shape", "colour", "count", "cells"}}``.
    """
    unknown = sorted(set(question_types) - set(QUESTION_TYPES))
    if unknown or not question_types:
        raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {question_types}")
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    rng = random.Random(seed)
    for index in range(num_samples):
        shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
        count = rng.randint(1, 3)
        cells = sorted(rng.sample(range(3), count))
        image = draw_shapes(shape, colour, cells, rng, image_size)
        answers_by_type = {"colour": colour, "shape": shape, "count": COUNT_WORDS[count - 1]}
        if count == 1:
            answers_by_type["position"] = POSITIONS[cells[0]]
        kinds = [k for k in question_types if k in answers_by_type]
        if not kinds:  # e.g. only "position" asked of a multi-shape image: ask the count instead
            kinds = ["count"]
        chosen = rng.sample(kinds, min(turns, len(kinds)))
        conversations = []
        for turn, kind in enumerate(chosen):
            question = _question(kind, shape, count, rng)
            conversations.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
            conversations.append({"from": "gpt", "value": answers_by_type[kind]})
        yield {
            "id": f"{id_prefix}-{index:06d}",
            "image": image,
            "conversations": conversations,
            "meta": {
                "question_types": chosen,
                "answers": [answers_by_type[k] for k in chosen],
                "shape": shape,
                "colour": colour,
                "count": count,
                "cells": cells,
            },
        }


def write_shapes_dataset(
    root: str | Path,
    splits: Mapping[str, int] | None = None,
    seed: int = 0,
    *,
    image_size: int = 32,
    turns: int = 1,
    question_types: tuple[str, ...] = QUESTION_TYPES,
) -> dict[str, Path]:
    """Write an LLaVA-JSON dataset folder (PNG images + one JSON file per split); returns ``{split: json path}``.

    ``splits`` maps split names to sizes (default ``{"train": 1000, "val": 200, "test": 200}``); each
    split has its own seed (``seed``, ``seed + 1``, ...), so the splits hold different images.
    """
    root = Path(root)
    splits = dict(splits or {"train": 1000, "val": 200, "test": 200})
    paths: dict[str, Path] = {}
    for offset, (split, size) in enumerate(splits.items()):
        image_dir = root / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        records = []
        for record in shapes_records(
            size, seed + offset, image_size=image_size, turns=turns, question_types=question_types, id_prefix=split
        ):
            relative = Path("images") / split / f"{record['id']}.png"
            record["image"].save(root / relative)
            records.append({**record, "image": relative.as_posix()})
        paths[split] = root / f"{split}.json"
        paths[split].write_text(json.dumps(records, indent=1) + "\n")
    return paths
