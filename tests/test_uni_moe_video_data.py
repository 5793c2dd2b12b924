"""Uni-MoE's videos through the conversation data (upstream's record format: ``"video"``, a list of frame files, one
``<video>`` per video): the records become placeholder runs and frames, batches collate, ``mome-eval eval_task=vqa
data=conversation`` answers with the videos, and the routing report counts video tokens as image tokens."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_cli import FAST, compose_eval
from test_eval_vqa_uni_moe import direct_answer

import mome
from mome.cli.eval import evaluate
from mome.data.base import DataConfigError
from mome.data.conversation import ConversationDataset, ConversationFormatError, collate_conversations
from mome.data.digits_audio import digit_waveform, write_wav
from mome.data.digits_conversation import WAV_GAIN
from mome.data.folders import load_image
from mome.models.moe_llava import TINY_VOCAB_SIZE

TINY = "uni_moe_tiny_e4"
VIDEO_ID = TINY_VOCAB_SIZE + 1  # the row after <audio>
FRAMES = 3
NEW_TOKENS = 3


def _record(record_id, question, answer, **media):
    return {
        "id": record_id,
        **media,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }


@pytest.fixture(scope="module")
def video_data(tmp_path_factory) -> tuple[Path, Path]:
    """A saved tiny Uni-MoE with a video input, and a folder of records: video + clip, image + video, video alone."""
    root = tmp_path_factory.mktemp("uni_moe_video")
    torch.manual_seed(0)
    model = mome.create_model(TINY, video_token_id=VIDEO_ID, text_overrides={"vocab_size": TINY_VOCAB_SIZE + 2})
    folder = Path(mome.save_pretrained(model, root / "model"))
    data = root / "data"
    (data / "frames").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def frames(name: str) -> list[str]:
        paths = []
        for frame in range(FRAMES):
            path = f"frames/{name}_{frame}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / path)
            paths.append(path)
        return paths

    write_wav(data / "seven.wav", WAV_GAIN * digit_waveform(7, 0))
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / "three.png")
    records = [
        _record("v0", "<video>\n<audio>\nwhat number is it?", "7", video=frames("v0"), audio="seven.wav"),
        _record("v1", "<image>\n<video>\nWhat number is shown?", "3", image="three.png", video=frames("v1")),
        _record("v2", "<video>\nWhat number is shown?", "5", video=frames("v2")),
    ]
    (data / "test.json").write_text(json.dumps(records))
    return folder, data


def _dataset(model, data: Path, records=None, **kwargs) -> ConversationDataset:
    return ConversationDataset(
        records if records is not None else data / "test.json",
        mome.get_tokenizer(TINY).tokenizer,
        image_token_id=model.config.image_token_id,
        num_image_tokens=model.num_image_tokens,
        image_root=data,
        image_size=32,
        audio_token_id=model.config.audio_token_id,
        num_audio_tokens=model.num_audio_tokens,
        video_token_id=kwargs.pop("video_token_id", model.config.video_token_id),
        **kwargs,
    )


def test_video_records_become_placeholder_runs_and_frames(video_data):
    folder, data = video_data
    model = mome.create_model(f"local-dir:{folder}").eval()
    dataset = _dataset(model, data)
    records = json.loads((data / "test.json").read_text())
    transform = dataset.transform
    for index, record in enumerate(records):
        sample = dataset[index]
        assert int((sample["input_ids"] == VIDEO_ID).sum()) == model.num_image_tokens  # one video, 16 ids
        frames = torch.stack([transform(load_image(data / frame)) for frame in record["video"]])  # [F, 3, 32, 32]
        torch.testing.assert_close(sample["videos"], frames[None], rtol=0, atol=0)
        assert (sample["labels"][sample["input_ids"] == VIDEO_ID] == -100).all()  # no loss on the video
    batch = collate_conversations([dataset[i] for i in range(3)])
    assert tuple(batch["videos"].shape) == (3, FRAMES, 3, 32, 32) and tuple(batch["audios"].shape) == (1, 80, 100)
    with torch.no_grad():  # as UniMoETask calls the model; each row equals that record alone (right padding)
        together = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "images", "audios", "videos")}).logits
        for row in range(3):
            alone = collate_conversations([dataset[row]])
            logits = model(**{k: alone[k] for k in ("input_ids", "images", "audios", "videos")}).logits
            torch.testing.assert_close(together[row, : logits.shape[1]], logits[0], atol=1e-5, rtol=1e-5)


def test_bad_video_records_name_the_record_and_the_field(video_data):
    folder, data = video_data
    model = mome.create_model(f"local-dir:{folder}")
    frames = json.loads((data / "test.json").read_text())[2]["video"]
    cases = {
        "2 video(s) but 1 <video>": _record("a", "<video>\nWhat?", "5", video=[frames, frames]),
        "frame file": _record("b", "<video>\nWhat?", "5", video=[*frames, "frames/gone.png"]),
        "an answer holds <video>": _record("c", "<video>\nWhat?", "<video>", video=frames),
        "non-empty list of frame files": _record("d", "<video>\nWhat?", "5", video=[[]]),
    }
    for expected, record in cases.items():
        with pytest.raises(ConversationFormatError, match=re.escape(expected)) as err:
            _dataset(model, data, [record])
        assert err.value.record_id == record["id"] and err.value.field.startswith(("video", "conversations"))
    with pytest.raises(ConversationFormatError, match="no video_token_id"):
        _dataset(model, data, video_token_id=None)
    short = _record("e", "<video>\nWhat?", "5", video=frames[:2])
    two = _dataset(model, data, [json.loads((data / "test.json").read_text())[2], short])
    with pytest.raises(DataConfigError, match=r"\[2, 3\] frames"):
        collate_conversations([two[0], two[1]])


def test_mome_eval_vqa_answers_with_the_videos(tmp_path, video_data):
    folder, data = video_data
    test_file = data / "test.json"
    overrides = [f"model=local-dir:{folder}", "eval_task=vqa", "data=conversation", f"data.train_file={test_file}"]
    overrides += [f"data.test_file={test_file}", f"eval_task.max_new_tokens={NEW_TOKENS}", "data.num_workers=0"]
    record, _ = evaluate(compose_eval(tmp_path / "eval", [*overrides, *FAST]))
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    model = mome.create_model(f"local-dir:{folder}").eval()
    records = json.loads((data / "test.json").read_text())
    direct = [direct_answer(model, record, data, NEW_TOKENS)[0] for record in records]
    assert [p["prediction"] for p in predictions] == direct and all(direct)
    assert all("<video>" not in p["question"] for p in predictions) and record["n_samples"] == 3
    routing = json.loads((tmp_path / "eval" / "routing.json").read_text())
    for entry in routing["layers"].values():  # 3 videos and 1 image (16 tokens each), 1 clip (10 tokens)
        per_modality = entry["per_modality"]
        assert per_modality["image"]["tokens"] == 4 * model.num_image_tokens
        assert per_modality["audio"]["tokens"] == model.num_audio_tokens
    batched_record, _ = evaluate(compose_eval(tmp_path / "batched", [*overrides, *FAST, "routing_report=false"]))
    batched = [json.loads(line) for line in (tmp_path / "batched" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in batched] == direct and batched_record["metrics"] == record["metrics"]


def test_the_uni_moe_task_trains_on_video_records(video_data):
    """``UniMoETask`` (``mome-train task=uni_moe``) gives a batch's videos to the model: the stage-2 loss reads them
    (it changes with the frames) and its gradient reaches the trained FFNs."""
    from mome.lit import UniMoETask

    folder, data = video_data
    options = {"video_token_id": VIDEO_ID, "text_overrides": {"vocab_size": TINY_VOCAB_SIZE + 2}}
    task = UniMoETask(model={"model_name": TINY, "moe_layers": "none", **options}, stage=2)
    batch = collate_conversations([_dataset(task.model, data)[i] for i in range(3)])
    inputs = task._model_inputs(batch)
    assert inputs["videos"] is batch["videos"]
    loss = task.model(input_ids=batch["input_ids"], labels=batch["labels"], **inputs).loss
    loss.backward()
    ffn = task.model.language_model.layers[0].mlp.down_proj.weight
    assert ffn.grad is not None and ffn.grad.abs().sum() > 0
    shuffled = {**inputs, "videos": batch["videos"].roll(1, dims=0)}  # each record gets another's video
    with torch.no_grad():
        other = task.model(input_ids=batch["input_ids"], labels=batch["labels"], **shuffled).loss
    assert not torch.isclose(other, loss.detach())
