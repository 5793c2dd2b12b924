"""Uni-MoE against outputs HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs' own code produced
(tests/data/upstream/uni_moe_speech/, written by ``tools/upstream_uni_moe.py``; see the folder's README).

The fixture is a tiny Uni-MoE-speech in upstream's released layout (``checkpoint/``: the stage-3 LoRA folder
``Uni-MoE-speech-e2`` beside the stage-2 base ``Uni-MoE-speech-base``, a CLIP and a Whisper folder), loaded by the
steps of upstream's ``load_all_pretrained_model`` (LoRA merged) and run on six prompts: image + one clip, one clip
of two 30-s chunks, image only, clip before image, video + clip, image + video (8 frames). Outputs: logits, each
layer's router logits, the image tower and projector outputs, the Whisper encoder and aligner outputs, each
video's frame-averaged features, 4 greedy tokens (upstream generates without the KV cache; mome with it).

mome builds ``uni_moe_llama_7b_e4`` at the fixture's sizes through both public routes:
``create_model(arch, checkpoint_path=<LoRA folder>, checkpoint_format="uni_moe", **TINY)`` and the card
``create_model("uni_moe_llama_7b_e4.speech_e2", pretrained=True, pretrained_cfg_overlay=dict(file=...), **TINY)``.
Upstream's ``-200`` / ``-400`` / ``-300`` ids become 16 image / 16 video / 8-per-chunk audio placeholder ids,
which mome puts past upstream's 96 words (rows the converter adds), so only the first 96 logits are compared. Diffs
are absolute (logits below about 5); generated tokens count as 0 when all agree. With mome's default SDPA
attention the logits round differently from upstream's eager attention (tolerance 2e-5); with
``attn_implementation="eager"`` the tolerance is the default 1e-5.

Not covered: fp16/bf16 (upstream evaluates in fp16 on GPU; the fixture is fp32 on CPU), padded batches.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from fidelity import FidelityCase, fixture_dir, fixture_meta, max_abs_diff
from safetensors.torch import load_file

import mome

ARCH, CARD = "uni_moe_llama_7b_e4", "uni_moe_llama_7b_e4.speech_e2"
FOLDER = "uni_moe_speech"
UPSTREAM_VOCAB = 96
IMAGE_ID, AUDIO_ID, VIDEO_ID = range(UPSTREAM_VOCAB, UPSTREAM_VOCAB + 3)  # mome's placeholders: rows past upstream's
#: the generator's tiny sizes (tools/upstream_uni_moe.py)
TINY = dict(
    vision_overrides=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4
    ),
    text_overrides=dict(
        vocab_size=UPSTREAM_VOCAB + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        pad_token_id=0,
    ),
    audio_overrides=dict(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=2,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        max_source_positions=50,
        max_target_positions=16,
    ),
    audio_num_queries=8,
    image_token_index=IMAGE_ID,
    audio_token_id=AUDIO_ID,
    video_token_id=VIDEO_ID,
)
UPSTREAM_IMAGE, UPSTREAM_AUDIO, UPSTREAM_VIDEO = -200, -300, -400
PROMPTS = ("prompt_a", "prompt_b", "prompt_c", "prompt_d", "prompt_e", "prompt_f")
NEW_TOKENS = 4


def checkpoint() -> Path:
    return fixture_dir(FOLDER) / "checkpoint"


@cache
def _tensors(name: str) -> dict[str, torch.Tensor]:
    return load_file(fixture_dir(FOLDER) / f"{name}.safetensors")


def mome_prompt(prompt: str, num_image_tokens: int, num_audio_tokens: int) -> dict[str, torch.Tensor]:
    """Upstream's batch of one prompt (one ``-200`` per image, ``-400`` per video, ``-300`` per clip of
    ``features_mask``'s chunks) -> mome's ``input_ids`` (placeholder runs), ``pixel_values``,
    ``pixel_values_videos`` and ``input_features`` (one clip per chunk)."""
    inputs = _tensors("inputs")
    ids = inputs[f"{prompt}.input_ids"][0].tolist()
    chunks = inputs[f"{prompt}.features_mask"][0]
    features = inputs[f"{prompt}.input_features"][0]  # [C, 80, 100]
    clips = [features[chunks == clip] for clip in sorted({int(c) for c in chunks if c > 0})]
    seq: list[int] = []
    clip = 0
    for token in ids:
        if token in (UPSTREAM_IMAGE, UPSTREAM_VIDEO):
            seq += [IMAGE_ID if token == UPSTREAM_IMAGE else VIDEO_ID] * num_image_tokens
        elif token == UPSTREAM_AUDIO:
            seq += [AUDIO_ID] * num_audio_tokens * len(clips[clip])
            clip += 1
        else:
            seq.append(token)
    out = {"input_ids": torch.tensor([seq])}
    if bool(inputs[f"{prompt}.image_mask"][0]):
        out["pixel_values"] = inputs[f"{prompt}.images"]
    if bool(inputs[f"{prompt}.video_mask"][0]):
        out["pixel_values_videos"] = inputs[f"{prompt}.videos"]
    if clips:
        out["input_features"] = torch.cat(clips)
    return out


def build(route: str, **kwargs) -> torch.nn.Module:
    """The fixture checkpoint through a public route: ``"path"`` (architecture + format) or ``"card"``."""
    lora = checkpoint() / "Uni-MoE-speech-e2"
    if route == "card":
        return mome.create_model(CARD, pretrained=True, pretrained_cfg_overlay=dict(file=str(lora)), **TINY, **kwargs)
    return mome.create_model(ARCH, checkpoint_path=lora, checkpoint_format="uni_moe", **TINY, **kwargs)


def run(model: torch.nn.Module, prompt: str) -> dict[str, torch.Tensor]:
    """mome's outputs for one fixture prompt, named as the fixture's."""
    model = model.eval()
    batch = mome_prompt(prompt, model.num_image_tokens, model.num_audio_tokens)
    out: dict[str, torch.Tensor] = {}
    hooks = [
        layer.mlp.router.register_forward_hook(
            lambda m, a, o, i=index: out.__setitem__(f"{prompt}.router_logits.{i}", o.router_logits.detach())
        )
        for index, layer in enumerate(model.language_model.layers)
    ]
    with torch.no_grad():
        out[f"{prompt}.logits"] = model(**batch).logits[..., :UPSTREAM_VOCAB]
        for hook in hooks:
            hook.remove()
        images = _tensors("inputs")[f"{prompt}.images"]  # the dummy zero image too, as upstream encodes it
        vision = model.vision_tower(images, output_hidden_states=True)
        out[f"{prompt}.image_tower_features"] = vision.hidden_states[-2][:, 1:]  # mm_vision_select_layer -2, patch
        out[f"{prompt}.image_features"] = model.projector(out[f"{prompt}.image_tower_features"])
        if "input_features" in batch:
            features = batch["input_features"]
            out[f"{prompt}.audio_tower_features"] = model.audio_tower(features[:1]).last_hidden_state
            out[f"{prompt}.audio_features"] = model.get_audio_features(features)
        if "pixel_values_videos" in batch:
            out[f"{prompt}.video_features"] = model.get_video_features(batch["pixel_values_videos"])
        generated = model.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        out[f"{prompt}.generated"] = generated[0, -NEW_TOKENS:]
    return out


def compare(route: str, attention: str | None = None):
    def measure() -> dict[str, float]:
        model = build(route)
        if attention is not None:
            model.set_attn_implementation(attention)
        ours: dict[str, torch.Tensor] = {}
        for prompt in PROMPTS:
            ours.update(run(model, prompt))
        theirs = _tensors("outputs")
        missing = sorted(set(theirs) - set(ours))
        assert not missing, f"mome produced no {missing}"
        return {name: max_abs_diff(ours[name], theirs[name]) for name in sorted(theirs)}

    return measure


#: SDPA (mome's default attention) rounds differently from upstream's eager attention (4.31's matmul + softmax):
#: up to 1.1e-5 on logits of about 4; with eager attention the largest diff stays below 1e-5
SDPA_TOLERANCE = 2e-5
LABEL = "Uni-MoE-speech (E=4, top-2, LoRA merged, Whisper-decoder aligner)"
CASES = [
    FidelityCase(f"{LABEL}, checkpoint_path, fp32", FOLDER, compare("path"), tolerance=SDPA_TOLERANCE),
    FidelityCase(f"{LABEL}, card, fp32", FOLDER, compare("card"), tolerance=SDPA_TOLERANCE, cards=(CARD,)),
    FidelityCase(f"{LABEL}, checkpoint_path, eager attention, fp32", FOLDER, compare("path", "eager")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fidelity(case):
    case.check()


def test_fixture_names_the_upstream_and_covers_the_uni_moe_card():
    meta = fixture_meta(FOLDER)
    assert meta["upstream"] == "HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs" and len(meta["commit"]) == 40
    assert meta["generator"] == "tools/upstream_uni_moe.py"
    cards = {p.stem for p in mome.zoo_dir().glob("uni_moe_*.yaml")}
    assert cards == {card for case in CASES for card in case.cards} == {CARD}
