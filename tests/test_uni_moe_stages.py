"""Uni-MoE's training path: the digits' tri-modal conversation data (WAV clips, ``<audio>`` placeholders) and the
three ``mome-train`` stages of ``conf/experiment/uni_moe_digits_stage{1,2,3}.yaml``, run as their headers say."""

from __future__ import annotations

import json
import math
import shlex
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import CONF

import mome
from mome._errors import InvalidArgumentError
from mome.data.conversation import ConversationDataset, ConversationFormatError, collate_conversations
from mome.data.digits_audio import SAMPLE_RATE, AudioFeatures, digit_waveform, read_wav, write_wav
from mome.data.digits_conversation import QUESTIONS, WAV_GAIN, write_digits_conversations
from mome.layers import Experts
from mome.lit import LLaVATask, TaskConfigError, UniMoETask

TINY = "uni_moe_tiny_e4"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mome.create_model(TINY, moe_layers="none")


def dataset(model, records, root, **kwargs):
    return ConversationDataset(
        records,
        mome.get_tokenizer(TINY).tokenizer,
        image_token_id=model.config.image_token_id,
        num_image_tokens=model.num_image_tokens,
        image_root=root,
        image_size=32,
        audio_token_id=kwargs.pop("audio_token_id", model.config.audio_token_id),
        num_audio_tokens=model.num_audio_tokens,
        **kwargs,
    )


# -- the WAV files -----------------------------------------------------------------------------------------------
def test_wav_round_trip(tmp_path):
    clip = 0.5 * digit_waveform(7, 3)
    path = write_wav(tmp_path / "seven.wav", clip)
    with wave.open(str(path)) as file:  # a standard 16 kHz mono 16-bit PCM file
        assert (file.getframerate(), file.getnchannels(), file.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        assert file.getnframes() == clip.shape[0]
    back = read_wav(path)
    assert back.dtype == np.float32 and back.shape == clip.shape
    # 16-bit rounding: at most half a quantisation step of 1/32767 (plus float32 rounding)
    assert np.abs(back - clip).max() <= 0.5 / 32767 + 1e-7
    assert not np.array_equal(read_wav(write_wav(tmp_path / "other.wav", 0.5 * digit_waveform(7, 4))), back)


def test_write_wav_refuses_clipping_and_stereo(tmp_path):
    with pytest.raises(InvalidArgumentError, match="peak 1.200"):
        write_wav(tmp_path / "loud.wav", np.full(800, 1.2))
    with pytest.raises(InvalidArgumentError, match="mono"):
        write_wav(tmp_path / "stereo.wav", np.zeros((2, 800)))
    assert not (tmp_path / "loud.wav").exists()


# -- the records -------------------------------------------------------------------------------------------------
def test_digits_conversations_round_trip(model, tmp_path):
    files = write_digits_conversations(tmp_path, {"train": 6, "test": 3})
    records = json.loads(files["train"].read_text())
    kinds = [record["meta"]["question_types"][0] for record in records]
    assert kinds == ["image", "audio", "both"] * 2
    data = dataset(model, files["train"], tmp_path)
    features = AudioFeatures()
    for record, kind in zip(records, kinds, strict=True):
        sample = data[records.index(record)]
        images, audios = int(kind != "audio"), int(kind != "image")
        assert record["conversations"][0]["value"] == QUESTIONS[kind]
        ids = sample["input_ids"]
        assert int((ids == model.config.image_token_id).sum()) == images * model.num_image_tokens
        assert int((ids == model.config.audio_token_id).sum()) == audios * model.num_audio_tokens
        assert sample["images"].shape == (images, 3, 32, 32) and sample["audios"].shape == (audios, 80, 100)
        if audios:  # the features are those of the WAV file's clip, which is the record's digit tone
            clip = read_wav(tmp_path / record["audio"])
            torch.testing.assert_close(sample["audios"], features([clip]), rtol=0, atol=0)
            digit, index = int(record["conversations"][1]["value"]), int(record["id"].split("-")[1])
            assert np.abs(clip - WAV_GAIN * digit_waveform(digit, index)).max() <= 0.5 / 32767 + 1e-7
        answer = sample["labels"][sample["labels"] != -100]
        words = data.tokenizer(record["conversations"][1]["value"], add_special_tokens=False)["input_ids"]
        assert answer.tolist() == [*words, data.tokenizer.eos_token_id]
    batch = collate_conversations([data[i] for i in range(3)])
    assert batch["images"].shape == (2, 3, 32, 32) and batch["audios"].shape == (2, 80, 100)
    # the model reads the batch: one clip per audio placeholder run, one image per image placeholder run
    output = model(**{k: v for k, v in batch.items()})
    assert torch.isfinite(output.loss)


def test_one_modality_writes_only_its_files(tmp_path):
    files = write_digits_conversations(tmp_path, {"train": 4}, modality="audio")
    records = json.loads(files["train"].read_text())
    assert all("image" not in record and record["audio"] for record in records)
    assert not (tmp_path / "images").exists() and len(list((tmp_path / "audio" / "train").glob("*.wav"))) == 4


def _one_record(tmp_path, audio="clip.wav", question="<audio>\nwhat number is it?"):
    return [
        {
            "id": "r0",
            "audio": audio,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "3"}],
        }
    ]


def test_missing_audio_file_is_a_typed_error(model, tmp_path):
    with pytest.raises(ConversationFormatError, match=r"record 'r0', field 'audio'.*clip.wav does not exist"):
        dataset(model, _one_record(tmp_path), tmp_path)


def test_wrong_sample_rate_is_a_typed_error(model, tmp_path):
    with wave.open(str(tmp_path / "clip.wav"), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(8000)
        file.writeframes(np.zeros(800, dtype="<i2").tobytes())
    with pytest.raises(ConversationFormatError, match=r"field 'audio'.*8000 Hz.*expected 16000 Hz mono"):
        dataset(model, _one_record(tmp_path), tmp_path)


def test_audio_placeholders_must_match_the_clips(model, tmp_path):
    write_wav(tmp_path / "clip.wav", 0.5 * digit_waveform(3, 0))
    with pytest.raises(ConversationFormatError, match=r"1 audio clip\(s\) but 2 <audio> placeholder\(s\)"):
        dataset(model, _one_record(tmp_path, question="<audio> <audio>\nwhat number is it?"), tmp_path)
    with pytest.raises(ConversationFormatError, match="model without an audio input"):
        dataset(model, _one_record(tmp_path), tmp_path, audio_token_id=None)


# -- the task ----------------------------------------------------------------------------------------------------
def test_task_refuses_other_families_and_unfit_stages():
    with pytest.raises(TaskConfigError, match="UniMoETask needs a Uni-MoE model"):
        UniMoETask(model={"model_name": "moe_llava_tiny_e4"}, stage=3)
    with pytest.raises(TaskConfigError, match="LLaVATask needs a MoE-LLaVA model"):
        LLaVATask(model={"model_name": TINY}, stage=3)
    with pytest.raises(TaskConfigError, match="task.stage=1"):
        UniMoETask(model={"model_name": TINY}, stage=1)  # stage 1 is dense
    with pytest.raises(TaskConfigError, match="task.stage=3 needs a model with MoE layers"):
        UniMoETask(model={"model_name": TINY, "moe_layers": "none"}, stage=3)
    with pytest.raises(TaskConfigError, match="task.modality=image"):
        UniMoETask(model={"model_name": TINY, "moe_layers": "none"}, stage=2, modality="image")


def _trainable(task) -> set[str]:
    return {name for name, param in task.model.named_parameters() if param.requires_grad}


def test_each_stage_trains_its_parameters():
    audio = UniMoETask(model={"model_name": TINY, "moe_layers": "none"}, stage=1, modality="audio")
    names = {name for name, _ in audio.model.named_parameters()}
    assert _trainable(audio) == {name for name in names if name.startswith("model.audio_projector.")}
    ffn = UniMoETask(model={"model_name": TINY, "moe_layers": "none"}, stage=2)
    assert _trainable(ffn) == {name for name in names if name.startswith("model.language_model.") and ".mlp." in name}
    last = UniMoETask(model={"model_name": TINY, "num_experts": 2}, stage=3, lora_r=4)
    kinds = {
        "lora": {name for name in _trainable(last) if ".lora_" in name},
        "router": {name for name in _trainable(last) if ".mlp.router." in name},
        "connector": {name for name in _trainable(last) if name.startswith(("model.audio_projector.", "model.multi"))},
    }
    assert all(kinds.values()) and set().union(*kinds.values()) == _trainable(last)
    assert last.model.language_model.layers[0].mlp.experts.lora_A["w_in"].shape[:2] == (2, 4)  # E, r


def test_stage_three_needs_one_stage_two_model_per_expert_from_one_stage_one(tmp_path):
    for seed in (0, 1):
        torch.manual_seed(seed)
        mome.save_pretrained(mome.create_model(TINY, moe_layers="none"), tmp_path / f"dense{seed}")
    task = UniMoETask(model={"model_name": TINY, "num_experts": 2}, stage=3)
    with pytest.raises(TaskConfigError, match="one stage-2 model per expert, model.num_experts=2"):
        task._initialise_from(str(tmp_path / "dense0"))
    with pytest.raises(TaskConfigError, match="differs from .* outside the FFNs"):
        task._initialise_from([str(tmp_path / "dense0"), str(tmp_path / "dense1")])


# -- the three stages, as the experiment headers say ---------------------------------------------------------------
def header_train_commands(name: str) -> list[list[str]]:
    """The overrides of each ``mome-train`` command in the header of ``experiment=<name>``."""
    commands = []
    for line in (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()[1:]:
        if not line.startswith("# mome-train "):
            break
        commands.append(shlex.split(line.removeprefix("# ").split("  (")[0])[1:])
    return commands


def _changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {key for key in before if not torch.equal(before[key], after[key])}


@pytest.mark.slow
def test_uni_moe_stages_run_end_to_end(tmp_path):
    """Stage 1 trains the connectors only, each stage-2 run only the LLM's FFNs, stage 3 starts with expert ``e``
    equal to the ``e``-th stage-2 model's FFNs and trains only the expert LoRAs, the routers and the connectors."""
    from test_experiments import SHORT, compose_run

    from mome.cli.train import train

    small = ["data.train_size=6", "data.val_size=3", "data.test_size=3", "data.batch_size=3", "data.eval_batch_size=3"]
    torch.manual_seed(0)
    initial = mome.create_model(TINY, moe_layers="none")  # stage 1 starts from these saved weights
    mome.save_pretrained(initial, tmp_path / "initial")
    commands = {stage: header_train_commands(f"uni_moe_digits_stage{stage}") for stage in (1, 2, 3)}
    assert [len(commands[stage]) for stage in (1, 2, 3)] == [1, 2, 1]
    exported = {}
    for stage in (1, 2, 3):
        for words in commands[stage]:
            extra = [f"task.init_from={tmp_path / 'initial'}"] if stage == 1 else []
            metrics, objects = train(compose_run(tmp_path, [*words, *SHORT, *small, *extra]))
            modality = next((word.split("=")[1] for word in words if word.startswith("data.modality=")), "all")
            kinds = ("image", "audio", "both") if modality == "all" else (modality,)
            assert {"test/exact_match", "test/lm_loss", *(f"test/exact_match/{kind}" for kind in kinds)} <= set(metrics)
            # an audio-only batch has no image rows: its logged means are weighted by samples, not images (a
            # weight of 0 made val/lm_loss NaN)
            losses = {k: float(v) for k, v in metrics.items() if k.endswith("loss")}
            assert {"val/lm_loss", "test/lm_loss"} <= set(losses) and all(map(math.isfinite, losses.values())), losses
            exported[Path(objects["export_dir"]).parent.name] = mome.create_model(f"local-dir:{objects['export_dir']}")
    assert set(exported) == {"stage1", "stage2_image", "stage2_audio", "stage3"}
    start, first = initial.state_dict(), exported["stage1"].state_dict()
    connectors = {k for k in start if k.startswith(("model.multi_modal_projector.", "model.audio_projector."))}
    changed = _changed(start, first)
    assert changed <= connectors
    assert any(k.startswith("model.audio_projector.") for k in changed)
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    ffns = {k for k in first if k.startswith("model.language_model.layers.") and ".mlp." in k}
    for modality in ("image", "audio"):
        changed = _changed(first, exported[f"stage2_{modality}"].state_dict())
        assert changed and changed <= ffns, modality
    # stage 3: the base weights are the stage-2 models' (bitwise) except the connectors and the experts, and
    # expert e of every layer is the e-th stage-2 model's FFN (LoRA B starts at 0, the experts' own weights freeze)
    last = exported["stage3"]
    state = last.state_dict()
    sources = [exported["stage2_image"], exported["stage2_audio"]]
    for key, value in sources[0].state_dict().items():
        if key not in ffns and key not in connectors:
            assert torch.equal(state[key], value), key
    for index, layer in enumerate(last.language_model.layers):
        experts = layer.mlp.experts
        for e, source in enumerate(sources):
            dense = Experts.from_dense(source.language_model.layers[index].mlp, 1)
            for param in ("w_in", "w_out"):
                assert torch.equal(getattr(experts.base_layer, param)[e], getattr(dense, param)[0]), (index, e, param)
        assert any(bool(b.abs().sum()) for b in experts.lora_B.values()), index  # the LoRAs trained
    image_start = sources[0].state_dict()
    assert any(not torch.equal(state[key], image_start[key]) for key in connectors)  # the connectors trained
