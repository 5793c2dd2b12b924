"""The embedded digits as tri-modal questions in the LLaVA conversation format (Uni-MoE's demo data).

Each digit of :func:`mome.data.digits.digits_splits` gives one record, asked about its image, its DTMF tone
(:func:`mome.data.digits_audio.digit_waveform` of the digit and the record's index) or both; the answer is the
digit's numeral ("0"-"9"):

============  ============================================  ===========================================
kind          human turn                                    files
============  ============================================  ===========================================
``image``     ``"<image>\\nWhat number is shown?"``          ``images/{split}/{i}.png`` (the 8x8 scan)
``audio``     ``"<audio>\\nwhat number is it?"``             ``audio/{split}/{i}.wav`` (16 kHz mono WAV)
``both``      ``"<image>\\n<audio>\\nWhat number is shown?"``  both (the tone is the image's digit)
============  ============================================  ===========================================

The tones are written at half amplitude (:data:`WAV_GAIN`): two tones of amplitude up to 0.6 plus noise peak above
the 16-bit full scale of 1.

``modality="image"`` / ``"audio"`` writes only that kind (Uni-MoE's stage-2 data of one modality expert);
``"all"`` cycles image, audio, both by record index. :func:`write_digits_conversations` writes::

    root/images/{split}/{i}.png  root/audio/{split}/{i}.wav
    root/{train,val,test}.json   # [{"id", "image"?, "audio"?, "conversations": [...], "meta"}]

read by :class:`mome.data.conversation.ConversationDataModule` (``meta.question_types`` is the kind, so test
reports exact match per modality).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from .base import DataConfigError
from .conversation import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, ConversationDataModule, write_once
from .digits import digits_splits
from .digits_audio import digit_waveform, write_wav

__all__ = ["MODALITIES", "QUESTIONS", "DigitsConversationDataModule", "write_digits_conversations"]

#: ``{kind: the human turn}``; the tiny MoE-LLaVA tokenizer knows every word.
QUESTIONS = {
    "image": f"{IMAGE_PLACEHOLDER}\nWhat number is shown?",
    "audio": f"{AUDIO_PLACEHOLDER}\nwhat number is it?",
    "both": f"{IMAGE_PLACEHOLDER}\n{AUDIO_PLACEHOLDER}\nWhat number is shown?",
}
MODALITIES = ("all", "image", "audio")
WAV_GAIN = 0.5  # a tone's peak is at most 2 * 0.6 plus noise: halved, it fits the WAV's [-1, 1]
_CYCLE = {"all": ("image", "audio", "both"), "image": ("image",), "audio": ("audio",)}
_SPLIT_OFFSET = {"train": 0, "val": 10_000, "test": 20_000}  # tone indices: the splits draw different tones


def write_digits_conversations(
    root: str | Path, sizes: Mapping[str, int], modality: str = "all", seed: int = 0
) -> dict[str, Path]:
    """Write the first ``sizes[split]`` digits of each split as records (see the module docstring); returns
    ``{split: json path}``. ``seed`` draws the tones (the digit splits are scikit-learn's fixed ones)."""
    if modality not in MODALITIES:
        raise DataConfigError(f"data.modality must be one of {MODALITIES}, got {modality!r}")
    root, splits, paths = Path(root), digits_splits(), {}
    for split, size in sizes.items():
        images, labels = splits[split]
        if not 0 < size <= len(labels):
            raise DataConfigError(
                f"data.{split}_size must be in 1..{len(labels)} (the digits' {split} split), got {size}"
            )
        records = []
        for index in range(size):
            digit, kind = int(labels[index]), _CYCLE[modality][index % len(_CYCLE[modality])]
            record: dict[str, Any] = {"id": f"{split}-{index}"}
            if kind in ("image", "both"):
                record["image"] = f"images/{split}/{index}.png"
                (root / "images" / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[index], mode="L").save(root / record["image"])
            if kind in ("audio", "both"):
                record["audio"] = f"audio/{split}/{index}.wav"
                (root / "audio" / split).mkdir(parents=True, exist_ok=True)
                write_wav(root / record["audio"], WAV_GAIN * digit_waveform(digit, _SPLIT_OFFSET[split] + index, seed))
            record["conversations"] = [
                {"from": "human", "value": QUESTIONS[kind]},
                {"from": "gpt", "value": str(digit)},
            ]
            record["meta"] = {"question_types": [kind], "answers": [str(digit)]}
            records.append(record)
        paths[split] = root / f"{split}.json"
        paths[split].write_text(json.dumps(records, indent=1) + "\n")
    return paths


class DigitsConversationDataModule(ConversationDataModule):
    """The tri-modal digits questions (see the module docstring), written to ``root`` on first use.

    Args:
        root: folder of the generated records; rewritten only if its ``spec.json`` differs from the requested
            sizes, modality and seed.
        modality: ``"all"`` (image, audio and both), ``"image"`` or ``"audio"`` questions only.
        train_size / val_size / test_size: records per split (at most the digits' 1,297 / 250 / 250).
        generation_seed: seed of the tones.
        **kwargs: :class:`~mome.data.conversation.ConversationDataModule` arguments.
    """

    def __init__(
        self,
        root: str | Path,
        modality: str = "all",
        train_size: int = 1297,
        val_size: int = 250,
        test_size: int = 250,
        generation_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if modality not in MODALITIES:
            raise DataConfigError(f"data.modality must be one of {MODALITIES}, got {modality!r}")
        self.root = Path(root)
        files = {f"{split}_file": self.root / f"{split}.json" for split in ("train", "val", "test")}
        super().__init__(**files, **kwargs)
        self.modality, self.generation_seed = modality, generation_seed
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    def prepare_files(self) -> None:
        spec = {"sizes": self.sizes, "modality": self.modality, "seed": self.generation_seed}
        write_once(
            self.root,
            spec,
            lambda: write_digits_conversations(self.root, self.sizes, self.modality, self.generation_seed),
        )
