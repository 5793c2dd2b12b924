"""``mome-eval eval_task=vqa data=digits_conversation`` on a saved Uni-MoE: questions about the DTMF tone, the image
and both are answered with the clips and images fed to ``generate``; exact match overall and per question kind;
the routing report counts the prompt's audio placeholders as audio tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_eval_cli import FAST, compose_eval
from timm.data import create_transform, resolve_model_data_config

import mome
from mome.cli.eval import evaluate
from mome.data.conversation import encode_prompt
from mome.data.digits_audio import AudioFeatures, read_wav
from mome.data.folders import load_image
from mome.lit.llava import exact_match

TINY = "uni_moe_tiny_e4"
NEW_TOKENS = 3
#: 6 test questions: image, audio, both, image, audio, both (data.modality=all cycles the kinds)
SIZES = ["data.train_size=3", "data.val_size=3", "data.test_size=6"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny Uni-MoE saved as ``mome-train`` exports it (``<run>/model``) and the digits-questions overrides."""
    root = tmp_path_factory.mktemp("uni_moe_vqa")
    torch.manual_seed(0)
    folder = mome.save_pretrained(mome.create_model(TINY), root / "run" / "model")
    return Path(folder), ["data=digits_conversation", f"data.root={root / 'data'}", *SIZES]


def _vqa(out: Path, saved: tuple[Path, list[str]], *extra: str) -> tuple[dict, list[dict]]:
    folder, data = saved
    overrides = [f"model=local-dir:{folder}", "eval_task=vqa", *data, f"eval_task.max_new_tokens={NEW_TOKENS}"]
    record, _ = evaluate(compose_eval(out, [*overrides, *FAST, *extra]))
    return record, [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def direct_answer(model, record: dict, data_root: Path, max_new_tokens: int = NEW_TOKENS) -> tuple[str, int, int]:
    """A record's first question answered by ``model``'s own ``generate``: the prompt encoded with the chat template,
    the image and a video's frames through the model's eval transform, the WAV through ``AudioFeatures``;
    ``(answer, prompt length, generated tokens)``."""
    tokenizer = mome.get_tokenizer(TINY).tokenizer
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    prompt = encode_prompt(
        tokenizer,
        record["conversations"][0]["value"],
        image_token_id=model.config.image_token_id,
        num_image_tokens=model.num_image_tokens,
        audio_token_id=model.config.audio_token_id,
        num_audio_tokens=model.num_audio_tokens,
        video_token_id=model.config.video_token_id,
    )
    inputs = {}
    if "image" in record:
        inputs["images"] = transform(load_image(data_root / record["image"]))[None]  # [1, 3, H, W]
    if "audio" in record:
        inputs["input_features"] = AudioFeatures(model.audio_input_shape[0])([read_wav(data_root / record["audio"])])
    if "video" in record:  # [1, F, 3, H, W]
        inputs["pixel_values_videos"] = torch.stack([transform(load_image(data_root / f)) for f in record["video"]])[
            None
        ]
    with torch.no_grad():
        output = model.generate(
            input_ids=prompt,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **inputs,
        )
    new = output[0, prompt.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), prompt.shape[1], new.numel()


def _direct_answers(folder: Path, data_root: Path) -> list[tuple[str, int, int]]:
    """Each test record's first question answered by the saved model's own ``generate`` (:func:`direct_answer`)."""
    model = mome.create_model(f"local-dir:{folder}").eval()
    return [direct_answer(model, record, data_root) for record in json.loads((data_root / "test.json").read_text())]


def test_uni_moe_vqa_answers_with_the_audio_and_the_images(tmp_path, saved):
    """Every answer is the model's own greedy ``generate`` given the question's image and clip; exact match per
    kind is the share of hits; the routing report's audio tokens are the prompts' audio placeholders."""
    folder, data = saved
    record, predictions = _vqa(tmp_path / "eval", saved)
    data_root = Path(data[1].split("=", 1)[1])
    records = json.loads((data_root / "test.json").read_text())
    assert record["task"] == "vqa" and record["n_samples"] == len(predictions) == 6
    assert [p["question_type"] for p in predictions] == ["image", "audio", "both"] * 2
    assert [p["answer"] for p in predictions] == [r["conversations"][1]["value"] for r in records]
    assert all("<audio>" not in p["question"] and "<image>" not in p["question"] for p in predictions)
    direct = _direct_answers(folder, data_root)
    assert [p["prediction"] for p in predictions] == [answer for answer, _, _ in direct]
    assert all(answer for answer, _, _ in direct)  # not a comparison of empty strings
    for p in predictions:
        assert p["hit"] == exact_match(p["prediction"], p["answer"])
    for kind in ("image", "audio", "both"):
        hits = [p["hit"] for p in predictions if p["question_type"] == kind]
        assert record["metrics"][f"exact_match/{kind}"] == pytest.approx(sum(hits) / len(hits))
    assert record["metrics"]["exact_match"] == pytest.approx(sum(p["hit"] for p in predictions) / 6)

    # routing: 4 questions show an image (16 tokens each), 4 play a clip (10 tokens each); the rest is text: the
    # prompts' other ids and every generated token but the last (the KV cache's decoding steps)
    model = mome.create_model(f"local-dir:{folder}")
    image_tokens, audio_tokens = 4 * model.num_image_tokens, 4 * model.num_audio_tokens
    text_tokens = sum(length + new - 1 for _, length, new in direct) - image_tokens - audio_tokens
    routing = json.loads((tmp_path / "eval" / "routing.json").read_text())
    assert len(routing["layers"]) == len(model.moe_layers) == 4
    for entry in routing["layers"].values():
        per_modality = entry["per_modality"]
        assert list(per_modality) == ["image", "text", "audio"]
        assert per_modality["image"]["tokens"] == image_tokens and per_modality["audio"]["tokens"] == audio_tokens
        assert per_modality["text"]["tokens"] == text_tokens
        for values in per_modality.values():
            assert sum(values["expert_load"]) == pytest.approx(1.0)

    # without the routing report the questions are answered three at a time (left-padded, clips concatenated)
    batched_record, batched = _vqa(tmp_path / "batched", saved, "routing_report=false", "data.eval_batch_size=3")
    assert batched == predictions and batched_record["metrics"] == record["metrics"]


@pytest.mark.slow
def test_documented_uni_moe_vqa_command(tmp_path, saved):
    """``mome-eval model=local-dir:<run>/model eval_task=vqa data=digits_conversation`` (docs/uni_moe.md) as a
    console command, on the 6 test questions: exit 0, the per-kind metrics in results.json."""
    folder, data = saved
    command = [sys.executable, "-m", "mome.cli.eval", f"model=local-dir:{folder}", "eval_task=vqa"]
    command += ["data=digits_conversation", *data[1:], "max_samples=3", f"hydra.run.dir={tmp_path / 'out'}"]
    result = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]
    assert set(metrics) == {"exact_match", "exact_match/image", "exact_match/audio", "exact_match/both"}
    assert "exact_match/audio" in result.stdout
