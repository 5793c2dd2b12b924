"""LLaVA-style conversation data: JSON records -> token ids, answer-only labels and images.

Record format (LLaVA's instruction-tuning JSON, e.g. ``llava_v1_5_mix665k.json``)::

    [{"id": "0001",
      "image": "rel/path.png",                       # optional; a list of paths for several images
      "audio": "rel/clip.wav",                       # optional (audio models); a list of paths for several clips
      "video": ["rel/f0.png", "rel/f1.png"],         # optional (video models): one video's frames; a list of such
                                                     # lists for several videos
      "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the shape?"},
                        {"from": "gpt",   "value": "red"}, ...]}]

Turns alternate ``human``, ``gpt``, ``human``, ... and end with ``gpt``. Each ``<image>`` in a human
turn is one image, in order; a record with one image and no ``<image>`` gets ``"<image>\\n"`` prepended
to its first human turn (as LLaVA). Paths are relative to ``image_root`` (default: the JSON's folder);
in-memory records may hold PIL images instead of paths (:func:`mome.data.shapes.shapes_records`).
Each ``<audio>`` in a human turn is one clip of ``audio``, in order (no implicit placeholder): a 16 kHz mono
16-bit PCM WAV file (:func:`mome.data.digits_audio.read_wav`), turned into ``[mel, frames]`` log-mel features by
:class:`mome.data.digits_audio.AudioFeatures`; a missing file or another sample rate, channel count or sample
width raises :class:`ConversationFormatError` when the dataset is built.
Each ``<video>`` in a human turn is one video of ``video``, in order (no implicit placeholder): its frames, image
files read as the images are (Uni-MoE's record format: a list of frame files per video).

Chat template (LLaVA v1 / Vicuna style, the separator of the assistant turns being the tokenizer's
end-of-sequence token)::

    {bos}{system }USER: {question_1} ASSISTANT: {answer_1}{eos}USER: {question_2} ASSISTANT: {answer_2}{eos}

``system`` is empty by default (:data:`LLAVA_SYSTEM_PROMPT` is upstream's). Each ``<image>`` becomes
``num_image_tokens`` copies of ``image_token_id`` (one per patch token of the vision tower; the model
puts the projected patch features there). Labels (next-token targets, shifted inside the model) equal
the input ids on the answer tokens and their ``eos`` and are -100 everywhere else (template, questions,
images, padding), so the loss is on the answers only. Each ``<audio>`` likewise becomes ``num_audio_tokens``
copies of ``audio_token_id`` and each ``<video>`` ``num_image_tokens`` copies of ``video_token_id`` (Uni-MoE:
:mod:`mome.models.uni_moe`); the ids need not be in the tokenizer's vocabulary, the placeholders are expanded
before tokenising.

Truncation to ``max_length`` never cuts an image (nor an audio clip or a video, counted like images): whole rounds
(question + answer) are kept while they fit; in the first round that does not fit, the text is cut only if the
cut falls after the round's last image token, otherwise that round and all later ones are dropped (with their
images). A record
whose first round cannot keep its images, or that keeps no answer token, raises
:class:`ConversationFormatError`.

:class:`ConversationDataset` yields ``{"id", "input_ids" [L], "labels" [L], "images" [n, 3, H, W]}`` (and
``"audios" [n_a, mel, frames]`` when bound to an audio model, ``"videos" [n_v, F, 3, H, W]`` to a video model);
:func:`collate_conversations` pads a list of them into ``{"images" [N_img, 3, H, W], "input_ids" [B, L],
"attention_mask" [B, L], "labels" [B, L]}`` (right padding; ``"audios" [N_aud, mel, frames]`` and ``"videos"
[N_vid, F, 3, H, W]`` when the samples have them), which ``MoELLaVA`` (``UniMoE``: ``audios``, ``videos``) takes as
keyword arguments.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # CLIP's normalisation
from torch import Tensor
from torch.utils.data import Dataset

from .base import DataConfigError, MomeDataModule, raw_image
from .folders import load_image

__all__ = [
    "IGNORE_INDEX",
    "AUDIO_PLACEHOLDER",
    "IMAGE_PLACEHOLDER",
    "VIDEO_PLACEHOLDER",
    "LLAVA_SYSTEM_PROMPT",
    "ConversationDataModule",
    "ConversationDataset",
    "ConversationFormatError",
    "ShapesDataModule",
    "collate_conversations",
    "encode_conversation",
    "encode_prompt",
    "first_question_type",
]

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
AUDIO_PLACEHOLDER = "<audio>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDERS = re.compile(f"({IMAGE_PLACEHOLDER}|{AUDIO_PLACEHOLDER}|{VIDEO_PLACEHOLDER})")
USER, ASSISTANT = "USER:", "ASSISTANT:"
#: The system prompt of LLaVA v1 / MoE-LLaVA's conversation templates.
LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class ConversationFormatError(DataConfigError):
    """A malformed conversation record; the message names the record id and the field."""

    def __init__(self, record_id: Any, field: str, problem: str) -> None:
        super().__init__(f"record {record_id!r}, field {field!r}: {problem}")
        self.record_id, self.field = record_id, field


# -- validation -----------------------------------------------------------------------------------
def _image_entries(record: Mapping[str, Any], field: str = "image") -> list[Any]:
    image = record.get(field)
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


def _validate_audio(record_id: Any, turns: list[dict[str, str]], clips: list[Any], root: Path | None) -> None:
    """As many ``<audio>`` placeholders as clips, each clip a readable 16 kHz mono 16-bit WAV file."""
    from .digits_audio import read_wav

    placeholders = sum(turn["value"].count(AUDIO_PLACEHOLDER) for turn in turns)
    if placeholders != len(clips):
        raise ConversationFormatError(
            record_id, "audio", f"{len(clips)} audio clip(s) but {placeholders} {AUDIO_PLACEHOLDER} placeholder(s)"
        )
    for position, clip in enumerate(clips):
        field = "audio" if len(clips) == 1 else f"audio[{position}]"
        if not isinstance(clip, str) or not clip:
            raise ConversationFormatError(record_id, field, f"expected a relative path, got {clip!r}")
        path = Path(clip) if root is None else root / clip
        try:
            read_wav(path, header_only=True)
        except (OSError, ValueError) as err:
            raise ConversationFormatError(record_id, field, str(err)) from err


def _check_image_file(record_id: Any, field: str, entry: Any, root: Path | None, kind: str = "image") -> None:
    """An image or a video frame: a PIL image, or a relative path to an existing file."""
    if isinstance(entry, Image.Image):
        return
    if not isinstance(entry, str) or not entry:
        raise ConversationFormatError(record_id, field, f"expected a relative path, got {entry!r}")
    path = Path(entry) if root is None else root / entry
    if not path.is_file():
        raise ConversationFormatError(record_id, field, f"{kind} file {path} does not exist")


def _video_entries(record: Mapping[str, Any]) -> list[Any]:
    """A record's videos, each a list of frames (``video``: one video's frame list, or a list of them)."""
    videos = record.get("video")
    if videos is None:
        return []
    if isinstance(videos, (list, tuple)) and videos and all(isinstance(v, (list, tuple)) for v in videos):
        return [list(video) for video in videos]
    return [videos]


def _validate_video(record_id: Any, turns: list[dict[str, str]], videos: list[Any], root: Path | None) -> None:
    """As many ``<video>`` placeholders as videos, each a non-empty list of existing frame files."""
    placeholders = sum(turn["value"].count(VIDEO_PLACEHOLDER) for turn in turns)
    if placeholders != len(videos):
        raise ConversationFormatError(
            record_id, "video", f"{len(videos)} video(s) but {placeholders} {VIDEO_PLACEHOLDER} placeholder(s)"
        )
    for position, frames in enumerate(videos):
        field = "video" if len(videos) == 1 else f"video[{position}]"
        if not isinstance(frames, (list, tuple)) or not frames:
            raise ConversationFormatError(record_id, field, f"expected a non-empty list of frame files, got {frames!r}")
        for number, frame in enumerate(frames):
            _check_image_file(record_id, f"{field}[{number}]", frame, root, kind="frame")


def _validate(record: Any, index: int, image_root: Path | None) -> list[dict[str, str]]:
    """Check one record; return its turns with the ``<image>`` placeholders made explicit."""
    if not isinstance(record, Mapping):
        raise ConversationFormatError(f"#{index}", "record", f"expected an object, got {type(record).__name__}")
    record_id = record.get("id", f"#{index}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ConversationFormatError(record_id, "conversations", "missing or empty list of turns")
    if len(turns) % 2:
        raise ConversationFormatError(
            record_id, "conversations", f"{len(turns)} turns: the last human turn has no gpt answer"
        )
    checked = []
    for position, turn in enumerate(turns):
        expected = "human" if position % 2 == 0 else "gpt"
        if not isinstance(turn, Mapping) or turn.get("from") != expected:
            got = turn.get("from") if isinstance(turn, Mapping) else type(turn).__name__
            raise ConversationFormatError(
                record_id, f"conversations[{position}].from", f"expected {expected!r}, got {got!r}"
            )
        value = turn.get("value")
        if not isinstance(value, str):
            raise ConversationFormatError(record_id, f"conversations[{position}].value", "missing or not a string")
        for placeholder in (IMAGE_PLACEHOLDER, AUDIO_PLACEHOLDER, VIDEO_PLACEHOLDER):
            if expected == "gpt" and placeholder in value:
                raise ConversationFormatError(
                    record_id, f"conversations[{position}].value", f"an answer holds {placeholder}"
                )
        checked.append({"from": expected, "value": value})
    images = _image_entries(record)
    placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in checked)
    if placeholders == 0 and len(images) == 1:  # LLaVA: the image goes before the first question
        checked[0] = {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{checked[0]['value']}"}
    elif placeholders != len(images):
        raise ConversationFormatError(
            record_id, "image", f"{len(images)} image(s) but {placeholders} {IMAGE_PLACEHOLDER} placeholder(s)"
        )
    for position, image in enumerate(images):
        _check_image_file(record_id, "image" if len(images) == 1 else f"image[{position}]", image, image_root)
    _validate_audio(record_id, checked, _image_entries(record, "audio"), image_root)
    _validate_video(record_id, checked, _video_entries(record), image_root)
    return checked


# -- tokenisation -----------------------------------------------------------------------------------
def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _human_chunks(
    tokenizer: Any,
    text: str,
    image_token_id: int,
    num_image_tokens: int,
    audio_token_id: int | None = None,
    num_audio_tokens: int = 0,
    video_token_id: int | None = None,
) -> list[tuple[list[int], str | None]]:
    """``[(ids, kind)]`` of ``USER: {text} ASSISTANT:``, each ``<image>`` / ``<audio>`` / ``<video>`` expanded into
    its placeholder ids (kind ``"image"`` / ``"audio"`` / ``"video"``; text chunks have kind None)."""
    expanded = {
        IMAGE_PLACEHOLDER: ("image", [image_token_id] * num_image_tokens),
        AUDIO_PLACEHOLDER: ("audio", [audio_token_id] * num_audio_tokens),
        VIDEO_PLACEHOLDER: ("video", [video_token_id] * num_image_tokens),
    }
    chunks: list[tuple[list[int], str | None]] = []
    for piece in _PLACEHOLDERS.split(f"{USER} {text} {ASSISTANT}"):  # text, placeholder, text, ...
        if piece in expanded:
            kind, ids = expanded[piece]
            if {"audio": audio_token_id, "video": video_token_id, "image": image_token_id}[kind] is None:
                raise ConversationFormatError("?", "conversations", f"a {piece} placeholder for a model without {kind}")
            chunks.append((ids, kind))
        else:
            chunks.append((_text_ids(tokenizer, piece.strip()), None))
    return chunks


def encode_conversation(
    turns: Sequence[Mapping[str, str]],
    tokenizer: Any,
    *,
    image_token_id: int,
    num_image_tokens: int,
    system: str = "",
    max_length: int | None = None,
    record_id: Any = "?",
    audio_token_id: int | None = None,
    num_audio_tokens: int = 0,
    video_token_id: int | None = None,
) -> tuple[list[int], list[int], int, int, int]:
    """Render, tokenise and truncate validated turns: ``(input_ids, labels, images kept, audio clips kept, videos
    kept)``.

    See the module docstring for the template, the labels and the truncation rule.
    """
    prefix = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + _text_ids(tokenizer, system)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    input_ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
    kept = {"image": 0, "audio": 0, "video": 0}
    for start in range(0, len(turns), 2):
        chunks = _human_chunks(
            tokenizer,
            turns[start]["value"],
            image_token_id,
            num_image_tokens,
            audio_token_id,
            num_audio_tokens,
            video_token_id,
        )
        question = [i for chunk, _ in chunks for i in chunk]
        answer = _text_ids(tokenizer, turns[start + 1]["value"]) + eos
        ids, round_labels = question + answer, [IGNORE_INDEX] * len(question) + answer
        media = {kind: sum(chunk_kind == kind for _, chunk_kind in chunks) for kind in kept}
        room = len(ids) if max_length is None else max_length - len(input_ids)
        if room < len(ids):
            offsets = torch.tensor([len(chunk) for chunk, _ in chunks]).cumsum(0).tolist()
            last_media_end = max((end for end, (_, kind) in zip(offsets, chunks) if kind), default=0)
            if room > 0 and room >= last_media_end:  # the cut falls in text after the last image/clip: keep the head
                input_ids, labels = input_ids + ids[:room], labels + round_labels[:room]
                kept = {kind: kept[kind] + media[kind] for kind in kept}
            break  # otherwise this round (and every later one) is dropped with its images, clips and videos
        input_ids, labels = input_ids + ids, labels + round_labels
        kept = {kind: kept[kind] + media[kind] for kind in kept}
    if len(input_ids) == len(prefix):
        raise ConversationFormatError(
            record_id, "conversations", f"max_length={max_length} cannot hold the first round with its images"
        )
    if all(label == IGNORE_INDEX for label in labels):
        raise ConversationFormatError(record_id, "conversations", f"no answer token fits in max_length={max_length}")
    return input_ids, labels, kept["image"], kept["audio"], kept["video"]


def encode_prompt(
    tokenizer: Any,
    question: str,
    *,
    image_token_id: int,
    num_image_tokens: int,
    system: str = "",
    audio_token_id: int | None = None,
    num_audio_tokens: int = 0,
    video_token_id: int | None = None,
) -> Tensor:
    """The generation prompt ``{bos}{system }USER: {question} ASSISTANT:`` as ids ``[1, L]`` (images, audio
    clips and videos expanded)."""
    prefix = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + _text_ids(tokenizer, system)
    chunks = _human_chunks(
        tokenizer, question, image_token_id, num_image_tokens, audio_token_id, num_audio_tokens, video_token_id
    )
    return torch.tensor([prefix + [i for chunk, _ in chunks for i in chunk]], dtype=torch.long)


# -- dataset -----------------------------------------------------------------------------------------
def _default_transform(image_size: int) -> Callable[[Image.Image], Tensor]:
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )


class ConversationDataset(Dataset):
    """LLaVA conversation records as dict samples (see the module docstring).

    Args:
        records: a JSON file (a list of records) or the records themselves.
        tokenizer: a transformers tokenizer (``bos_token_id``/``eos_token_id`` are used if set); None for a model
            whose processor tokenises and transforms (transformers' VLMs): the samples are then
            ``{"id", "images": list of PIL images}`` (``image_token_id``, ``num_image_tokens`` and ``transform``
            unused).
        image_token_id: the model's placeholder id (``model.config.image_token_id``).
        num_image_tokens: placeholders per image (``model.num_image_tokens``).
        image_root: folder the image paths are relative to (default: the JSON file's folder).
        transform: PIL image -> ``[3, H, W]`` tensor; default: bicubic resize to ``image_size`` and
            CLIP normalisation.
        image_size: image side of the default transform (and of the empty image tensor of text-only samples).
        max_length: truncate to this many tokens (images never cut; see the module docstring).
        system: system prompt put after ``bos`` (default none).
        audio_token_id / num_audio_tokens: the audio placeholder id and ids per clip of an audio model
            (``model.config.audio_token_id``, ``model.num_audio_tokens``); None for a model without audio, whose
            records may not hold ``audio``.
        num_mel_bins: mel bins of the clips' features (:class:`~mome.data.digits_audio.AudioFeatures`).
        video_token_id: the video placeholder id of a video model (``model.config.video_token_id``; a video takes
            ``num_image_tokens`` ids); None for a model without video, whose records may not hold ``video``.

    Every record is validated at construction: malformed ones raise :class:`ConversationFormatError`
    naming the record id and the field (missing turns, wrong roles, missing image file, ...).
    """

    def __init__(
        self,
        records: str | Path | Sequence[Mapping[str, Any]],
        tokenizer: Any,
        *,
        image_token_id: int | None,
        num_image_tokens: int | None,
        image_root: str | Path | None = None,
        transform: Callable[[Image.Image], Tensor] | None = None,
        image_size: int = 336,
        max_length: int | None = None,
        system: str = "",
        audio_token_id: int | None = None,
        num_audio_tokens: int = 0,
        num_mel_bins: int = 80,
        video_token_id: int | None = None,
    ) -> None:
        if isinstance(records, (str, Path)):
            path = Path(records)
            if not path.is_file():
                raise DataConfigError(f"conversation file {path} does not exist")
            try:
                records = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise DataConfigError(f"{path} is not valid JSON: {err}") from err
            image_root = path.parent if image_root is None else image_root
        if not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
            raise DataConfigError(f"expected a list of conversation records, got {type(records).__name__}")
        self.image_root = None if image_root is None else Path(image_root)
        self.records = list(records)
        self.turns = [_validate(record, index, self.image_root) for index, record in enumerate(self.records)]
        for index, record in enumerate(self.records):
            if audio_token_id is None and _image_entries(record, "audio"):
                problem = "audio clips for a model without an audio input (no audio_token_id)"
                raise ConversationFormatError(record.get("id", f"#{index}"), "audio", problem)
            if video_token_id is None and _video_entries(record):
                problem = "videos for a model without a video input (no video_token_id)"
                raise ConversationFormatError(record.get("id", f"#{index}"), "video", problem)
        self.video_token_id = video_token_id
        self.audio_token_id, self.num_audio_tokens = audio_token_id, num_audio_tokens
        self.audio_features = None
        if audio_token_id is not None:
            from .digits_audio import AudioFeatures

            self.audio_features = AudioFeatures(num_mel_bins)
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.image_size = image_size
        self.transform = transform or (_default_transform(image_size) if tokenizer is not None else raw_image)
        self.max_length = max_length
        self.system = system

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, image: Any) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        path = Path(image) if self.image_root is None else self.image_root / image
        return load_image(path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        record_id = record.get("id", f"#{index}")
        if self.tokenizer is None:  # raw: the model's processor tokenises and transforms
            return {"id": record_id, "images": [self._load(image) for image in _image_entries(record)]}
        input_ids, labels, kept, kept_audios, kept_videos = encode_conversation(
            self.turns[index],
            self.tokenizer,
            image_token_id=self.image_token_id,
            num_image_tokens=self.num_image_tokens,
            system=self.system,
            max_length=self.max_length,
            record_id=record_id,
            audio_token_id=self.audio_token_id,
            num_audio_tokens=self.num_audio_tokens,
            video_token_id=self.video_token_id,
        )
        images = [self.transform(self._load(image)) for image in _image_entries(record)[:kept]]
        stacked = torch.stack(images) if images else torch.zeros(0, 3, self.image_size, self.image_size)
        sample = {
            "id": record_id,
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "images": stacked,  # [n, 3, H, W]
        }
        if self.audio_features is not None:
            sample["audios"] = self.load_audio(_image_entries(record, "audio")[:kept_audios])  # [n_a, mel, frames]
        if self.video_token_id is not None:
            sample["videos"] = self.load_videos(_video_entries(record)[:kept_videos], record_id)  # [n_v, F, 3, H, W]
        return sample

    def load_videos(self, videos: Sequence[Sequence[Any]], record_id: Any = "?") -> Tensor:
        """Videos (each a list of frame files relative to ``image_root``, or PIL images) -> ``[n, F, 3, H, W]``
        through the image transform (``n`` may be 0); the videos of one record must have one frame count."""
        if not videos:
            return torch.zeros(0, 1, 3, self.image_size, self.image_size)
        counts = sorted({len(frames) for frames in videos})
        if len(counts) > 1:
            problem = f"videos of {counts} frames: a record's videos share one frame count"
            raise ConversationFormatError(record_id, "video", problem)
        return torch.stack([torch.stack([self.transform(self._load(frame)) for frame in frames]) for frames in videos])

    def load_audio(self, clips: Sequence[str]) -> Tensor:
        """WAV files (relative to ``image_root``) -> log-mel features ``[n, mel, frames]`` (``n`` may be 0)."""
        from .digits_audio import SAMPLE_RATE, read_wav

        features = self.audio_features
        if not clips:
            return torch.zeros(0, features.num_mel_bins, features.num_frames)
        paths = [Path(clip) if self.image_root is None else self.image_root / clip for clip in clips]
        return features([read_wav(path) for path in paths], sampling_rate=SAMPLE_RATE)


def collate_conversations(samples: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, Tensor]:
    """Right-pad samples into ``{"images" [N_img, 3, H, W], "input_ids", "attention_mask", "labels"}`` (``[B, L]``).

    Padding positions get ``pad_token_id``, attention 0 and label -100; the images of all samples are
    concatenated in sample order (the order of their placeholders in the batch).
    """
    if not samples:
        raise ValueError("collate_conversations: empty batch")
    length = max(sample["input_ids"].shape[0] for sample in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for row, sample in enumerate(samples):
        size = sample["input_ids"].shape[0]
        input_ids[row, :size] = sample["input_ids"]
        labels[row, :size] = sample["labels"]
        attention_mask[row, :size] = 1
    images = torch.cat([sample["images"] for sample in samples])  # [N_img, 3, H, W]
    batch = {"images": images, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if "audios" in samples[0]:
        batch["audios"] = torch.cat([sample["audios"] for sample in samples])  # [N_aud, mel, frames]
    if "videos" in samples[0]:
        videos = [sample["videos"] for sample in samples if sample["videos"].shape[0]]
        counts = sorted({video.shape[1] for video in videos})
        if len(counts) > 1:
            ids = [sample.get("id") for sample in samples]
            raise DataConfigError(
                f"the videos of records {ids} have {counts} frames: a batch's videos share one frame count "
                "(give every video as many frames, or use batch size 1)"
            )
        empty = samples[0]["videos"][:0]
        batch["videos"] = torch.cat(videos) if videos else empty  # [N_vid, F, 3, H, W]
    return batch


# -- Lightning data modules -----------------------------------------------------------------------------
class ConversationDataModule(MomeDataModule):
    """LLaVA-JSON conversations for instruction tuning (and VQA exact-match evaluation).

    Training and validation batches are :func:`collate_conversations` batches; test batches add the
    first question of each record as a generation prompt and its reference answer:
    ``{"prompt_ids": list of [1, L], "prompt_images": list of [n, 3, H, W], "answers": list of str,
    "question_types": list of str | None}`` (types from the records' ``meta`` when present).

    Args:
        train_file / val_file / test_file: LLaVA-JSON files (paths relative to each file's folder, or
            to ``image_root``).
        image_root: folder the image paths are relative to.
        max_length: token budget per sample (images are never cut; see the module docstring).
        system: the system prompt.
        **kwargs: :class:`~mome.data.base.MomeDataModule` arguments; ``train_augment`` defaults to
            False (flips would swap "left" and "right").

    :meth:`bind` takes the model (its image token id, image tokens per image, input size and
    normalisation) and the Hugging Face tokenizer (``tokenizer.tokenizer`` of mome's wrapper).
    """

    def __init__(
        self,
        train_file: str | Path | None = None,
        val_file: str | Path | None = None,
        test_file: str | Path | None = None,
        image_root: str | Path | None = None,
        max_length: int | None = None,
        system: str = "",
        train_augment: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_augment=train_augment, **kwargs)
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.image_root, self.max_length, self.system = image_root, max_length, system
        self.image_token_id: int | None = None
        self.num_image_tokens: int | None = None
        self.audio_token_id: int | None = None
        self.num_audio_tokens, self.num_mel_bins = 0, 80
        self.video_token_id: int | None = None
        self.raw = False

    def bind(self, model: Any, tokenizer: Any = None) -> None:
        super().bind(model, tokenizer)
        if tokenizer is None:
            raise DataConfigError("conversation data needs the model's tokenizer")
        self.hf_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.image_token_id = int(model.config.image_token_id)
        self.num_image_tokens = int(model.num_image_tokens)
        audio_shape = getattr(model, "audio_input_shape", None)  # Uni-MoE: (mel bins, frames)
        if audio_shape is not None:
            from .digits_audio import SAMPLE_RATE, AudioFeatures

            frames = AudioFeatures(audio_shape[0]).num_frames
            if audio_shape[1] != frames:
                raise DataConfigError(
                    f"the model reads audio features of {audio_shape[1]} frames, the conversation data's clips give "
                    f"{frames} (1 s at {SAMPLE_RATE} Hz, 10 ms hop)"
                )
            self.audio_token_id, self.num_audio_tokens = int(model.config.audio_token_id), int(model.num_audio_tokens)
            self.num_mel_bins = int(audio_shape[0])
        video_token_id = getattr(model.config, "video_token_id", None)  # Uni-MoE with videos
        self.video_token_id = None if video_token_id is None else int(video_token_id)
        self.collate_fn = self._collate

    def bind_raw(self) -> None:
        """Bind for a model that brings its own processor (transformers' VLMs, :mod:`mome.models.hf_moe_vlm`): the
        records are validated as usual, but not tokenised and their images not transformed; the datasets yield
        raw samples (:class:`ConversationDataset` with ``tokenizer=None``) for the processor to encode."""
        super().bind_raw()
        self.raw = True
        self.hf_tokenizer = None

    def prepare_files(self) -> None:
        """Hook for subclasses that generate their files (:class:`ShapesDataModule`)."""

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self._require_bound()
        self.prepare_files()
        for split, file in self.files.items():
            if file is None:
                if split == "train":
                    raise DataConfigError("data.train_file is required (a LLaVA-JSON conversation file)")
                continue
            if not Path(file).is_file():
                raise DataConfigError(f"data.{split}_file: {file} does not exist")
            transform = self.train_transform if split == "train" else self.eval_transform
            self.datasets[split] = ConversationDataset(
                file,
                self.hf_tokenizer,
                image_token_id=self.image_token_id,
                num_image_tokens=self.num_image_tokens,
                image_root=self.image_root,
                transform=None if self.raw else transform,
                image_size=int(self.data_config["input_size"][-1]) if not self.raw else 0,
                max_length=self.max_length,
                system=self.system,
                audio_token_id=self.audio_token_id,
                num_audio_tokens=self.num_audio_tokens,
                num_mel_bins=self.num_mel_bins,
                video_token_id=self.video_token_id,
            )

    def _collate(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = collate_conversations(samples, pad_token_id=self.hf_tokenizer.pad_token_id or 0)
        if "prompt_ids" in samples[0]:
            for key in ("prompt_ids", "prompt_images", "prompt_audios", "prompt_videos", "answers", "question_types"):
                if key in samples[0]:
                    batch[key] = [sample[key] for sample in samples]
        return batch

    def missing_split(self, split: str) -> str:
        return f"data.{split}_file is not set: {type(self).__name__} has no {split!r} split"

    def test_dataloader(self) -> Any:
        if "test" not in self.datasets:
            self.setup("test")
        if "test" not in self.datasets:
            raise DataConfigError(self.missing_split("test"))
        dataset = PromptedConversations(self.datasets["test"])
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self._collate,
        )


class PromptedConversations(Dataset):
    """A :class:`ConversationDataset` whose samples also carry the first question as a generation prompt."""

    def __init__(self, dataset: ConversationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        data, record = self.dataset, self.dataset.records[index]
        turns = data.turns[index]
        sample["prompt_ids"] = encode_prompt(
            data.tokenizer,
            turns[0]["value"],
            image_token_id=data.image_token_id,
            num_image_tokens=data.num_image_tokens,
            system=data.system,
            audio_token_id=data.audio_token_id,
            num_audio_tokens=data.num_audio_tokens,
            video_token_id=data.video_token_id,
        )
        images_in_prompt = turns[0]["value"].count(IMAGE_PLACEHOLDER)
        sample["prompt_images"] = sample["images"][:images_in_prompt]
        if "audios" in sample:
            sample["prompt_audios"] = sample["audios"][: turns[0]["value"].count(AUDIO_PLACEHOLDER)]
        if "videos" in sample:
            sample["prompt_videos"] = sample["videos"][: turns[0]["value"].count(VIDEO_PLACEHOLDER)]
        sample["answers"] = turns[1]["value"]
        sample["question_types"] = first_question_type(record)
        return sample


def first_question_type(record: Mapping[str, Any]) -> str | None:
    """The type of a record's first question (``meta.question_types[0]``), or None."""
    return (record.get("meta") or {}).get("question_types", [None])[0]


class ShapesDataModule(ConversationDataModule):
    """The synthetic shapes VQA set (:mod:`mome.data.shapes`), written to ``root`` on first use.

    Args:
        root: folder of the generated dataset (``train.json``, ``val.json``, ``test.json``, ``images/``);
            regenerated only if its ``spec.json`` differs from the requested sizes and seed.
        train_size / val_size / test_size: records per split.
        seed: generation seed (also the base seed of the training order).
        **kwargs: :class:`ConversationDataModule` arguments.
    """

    def __init__(
        self,
        root: str | Path,
        train_size: int = 2000,
        val_size: int = 200,
        test_size: int = 300,
        generation_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        self.root = Path(root)
        files = {f"{split}_file": self.root / f"{split}.json" for split in ("train", "val", "test")}
        super().__init__(**files, **kwargs)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.generation_seed = generation_seed

    def prepare_files(self) -> None:
        from .shapes import write_shapes_dataset

        spec = {"sizes": self.sizes, "seed": self.generation_seed}
        write_once(self.root, spec, lambda: write_shapes_dataset(self.root, self.sizes, seed=self.generation_seed))


def write_once(root: Path, spec: Mapping[str, Any], write: Callable[[], Any]) -> None:
    """Run ``write`` (which fills ``root``) unless ``root/spec.json`` already holds ``spec``; the spec is written
    last, so a half-written folder is written again."""
    spec_file = root / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return
    root.mkdir(parents=True, exist_ok=True)
    write()
    spec_file.write_text(json.dumps(spec) + "\n")
