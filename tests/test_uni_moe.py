"""Uni-MoE: variants, audio path, bad input, generation with the KV cache, the three training stages."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.models.whisper.modeling_whisper import WhisperDecoder, WhisperEncoder

import mome
from mome.data.digits_audio import AudioFeatures, digit_waveform
from mome.layers import MoE
from mome.models.moe_llava import TINY_IMAGE_TOKEN_ID, TINY_VOCAB_SIZE
from mome.models.uni_moe import UniMoE, add_expert_lora, configure_stage

TINY = "uni_moe_tiny_e4"


def tiny(**kwargs):
    torch.manual_seed(0)
    return mome.create_model(TINY, **kwargs)


def prompt(model, before=(1, 5, 8), images=0, audios=0, after=(17, 18, 9, 6, 8)):
    """``[bos USER :] + images x (placeholders, 2 words) + audios x (placeholders, 2 words) + [... ASSISTANT :]``."""
    ids = list(before)
    for _ in range(images):
        ids += [model.config.image_token_id] * model.num_image_tokens + [20, 22]
    for _ in range(audios):
        ids += [model.config.audio_token_id] * model.num_audio_tokens + [21, 23]
    return ids + list(after)


def digit_features(*digits):
    """The embedded digits' DTMF tones as Whisper log-mel features ``[N, 80, 100]``."""
    return AudioFeatures()([digit_waveform(d, index=i) for i, d in enumerate(digits)])


# -- variants ---------------------------------------------------------------------------------------------------
def test_paper_size_variant_on_meta():
    with torch.device("meta"):
        model = mome.create_model("uni_moe_llama_7b_e4")
    assert isinstance(model, UniMoE) and model.moe_layers == list(range(32))
    assert model.num_image_tokens == 576 and model.num_audio_tokens == 50 and model.audio_input_shape == (80, 3000)
    assert isinstance(model.audio_tower, WhisperEncoder) and len(model.audio_tower.layers) == 12
    # upstream's aligner: 50 queries through Whisper-small's 12-layer decoder (no token table), a linear projector
    assert isinstance(model.model.audio_aligner, WhisperDecoder) and len(model.model.audio_aligner.layers) == 12
    assert model.model.audio_aligner.embed_tokens is None
    assert tuple(model.model.audio_query_tokens.shape) == (1, 50, 768)
    assert isinstance(model.audio_projector, torch.nn.Linear) and model.audio_projector.out_features == 4096
    moe = model.language_model.layers[0].mlp
    assert moe.experts.num_experts == 4 and moe.router.top_k == 2 and moe.capacity_factor is None
    assert tuple(moe.experts.w_in.shape) == (4, 2 * 11008, 4096)  # SwiGLU: gate rows then up rows
    assert model.pretrained_cfg.paper_ids == "arXiv:2405.11273"


def test_tiny_variant_parts_and_registry():
    assert {"uni_moe_tiny_e4", "uni_moe_llama_7b_e4"} <= set(mome.list_models("uni_moe_*"))
    model = tiny()
    assert model.moe_layers == [0, 1, 2, 3] and model.num_audio_tokens == 10 and model.audio_input_shape == (80, 100)
    assert model.config.audio_token_id == model.config.text_config.vocab_size - 1
    with pytest.raises(mome.UnsupportedOptionError, match="WhisperConfig"):
        tiny(audio_overrides={"not_a_field": 1})
    with pytest.raises(
        mome.InvalidArgumentError, match="audio_pool_stride must be a divisor of audio_config.max_source"
    ):
        tiny(audio_overrides={"max_source_positions": 51})  # 51 frames cannot be pooled 5 at a time


# -- audio path -------------------------------------------------------------------------------------------------
def test_audio_features_are_pooled_whisper_frames_through_the_connector():
    model = tiny().eval()
    features = digit_features(1, 7)
    with torch.no_grad():
        frames = model.audio_tower(features).last_hidden_state  # [2, 50, 32]
        pooled = F.avg_pool1d(frames.transpose(1, 2), kernel_size=5).transpose(1, 2)  # [2, 10, 32]
        torch.testing.assert_close(model.get_audio_features(features), model.audio_projector(pooled))


def aligned(**kwargs):
    """The tiny model with upstream's audio connector: 6 queries through a 2-layer Whisper decoder."""
    return tiny(audio_connector="whisper_decoder", audio_num_queries=6, **kwargs)


def test_whisper_decoder_connector_reads_the_encoder_with_causal_queries():
    model = aligned().eval()
    assert model.num_audio_tokens == 6 and isinstance(model.audio_projector[0], torch.nn.Linear)
    features = digit_features(1, 7)
    queries = model.model.audio_query_tokens
    with torch.no_grad():
        queries.copy_(torch.randn_like(queries))
        for param in model.model.audio_aligner.parameters():  # past the small init, so cross-attention matters
            param.normal_(0, 0.3)
        out = model.get_audio_features(features)  # [2, 6, 64]
        assert tuple(out.shape) == (2, 6, 64)
        assert not torch.allclose(out[0], out[1], atol=1e-4)  # each clip's own encoder output is read
        queries[0, 3] += torch.randn_like(
            queries[0, 3]
        )  # the decoder's self-attention is causal: queries 0-2 do not see query 3
        moved = model.get_audio_features(features)
    torch.testing.assert_close(moved[:, :3], out[:, :3], rtol=0, atol=0)
    assert not torch.allclose(moved[:, 3:], out[:, 3:], atol=1e-4)
    ids = torch.tensor([prompt(model, audios=2)])
    with torch.no_grad():
        cached = model.generate(input_ids=ids, input_features=features, max_new_tokens=3, do_sample=False)
        plain = model.generate(
            input_ids=ids, input_features=features, max_new_tokens=3, do_sample=False, use_cache=False
        )
    assert torch.equal(cached, plain)
    with pytest.raises(mome.InvalidArgumentError, match="audio_num_queries must be at most audio_config.max_target"):
        tiny(audio_connector="whisper_decoder", audio_num_queries=17)
    with pytest.raises(mome.InvalidArgumentError, match="audio_connector"):
        tiny(audio_connector="qformer")
    linear = tiny(audio_connector="whisper_decoder", audio_num_queries=4, audio_projector_type="linear")
    assert isinstance(linear.audio_projector, torch.nn.Linear)


def test_whisper_decoder_connector_trains_as_upstream_per_stage():
    """Upstream's stage 1 tunes the whole aligner (``tune_mm_audio_aligner``: decoder, queries, projector); its
    stage 3 only the aligner's projector (``tune_mm_audio_projector``)."""
    model = aligned(moe_layers="none")
    aligner = {n for n, _ in model.named_parameters() if n.startswith(("model.audio_aligner.", "model.audio_query"))}
    projector = {n for n, _ in model.named_parameters() if n.startswith("model.audio_projector.")}
    image = {n for n, _ in model.named_parameters() if n.startswith("model.multi_modal_projector.")}
    assert len(aligner) > 20 and trainable(configure_stage(model, 1, modality="audio")) == aligner | projector
    assert_only_trained_changed(model, train_step(model), aligner | projector)
    sparse = copy.deepcopy(model).upcycle("all", capacity_factor=None, eval_capacity_factor=None)
    add_expert_lora(sparse)
    stage3 = trainable(configure_stage(sparse, 3))
    assert projector | image <= stage3 and not stage3 & aligner


def test_audio_and_images_enter_at_their_placeholders():
    model = tiny().eval()
    ids = torch.tensor([prompt(model, images=1, audios=2)])
    images, audio = torch.randn(1, 3, 32, 32), digit_features(3, 9)
    with torch.no_grad():
        out = model(input_ids=ids, images=images, input_features=audio)
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[ids == model.config.audio_token_id] = model.get_audio_features(audio).reshape(-1, 64)
        image_features = model.model.get_image_features(pixel_values=images).pooler_output[0]
        embeds[ids == model.config.image_token_id] = image_features.reshape(-1, 64)
        by_hand = model.lm_head(model.language_model(inputs_embeds=embeds).last_hidden_state)
    torch.testing.assert_close(out.logits, by_hand)
    first_audio = prompt(model, images=1).index(17)  # the position the first clip starts at
    with torch.no_grad():
        swapped = model(input_ids=ids, images=images, audios=digit_features(9, 3)).logits
    torch.testing.assert_close(swapped[:, :first_audio], out.logits[:, :first_audio])  # causal: before the audio
    assert not torch.allclose(swapped[:, -1], out.logits[:, -1])
    empty = torch.zeros(0, 80, 100)
    text = torch.tensor([prompt(model)])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=text, input_features=empty).logits, model(input_ids=text).logits)


def test_bad_audio_is_a_typed_error_naming_the_expected_shape():
    model = tiny().eval()
    ids = torch.tensor([prompt(model, audios=1)])
    with pytest.raises(mome.InvalidInputError, match=r"input_features must be log-mel features \[N_audio, 80, 100\]"):
        model(input_ids=ids, input_features=torch.randn(1, 80, 3000))  # Whisper's 30 s window, not the tiny one
    with pytest.raises(mome.InvalidInputError, match=r"audios must be log-mel features \[N_audio, 80, 100\]"):
        model(input_ids=ids, audios=torch.randn(80, 100))
    with pytest.raises(mome.InvalidInputError, match="floating"):
        model(input_ids=ids, input_features=torch.zeros(1, 80, 100, dtype=torch.long))
    with pytest.raises(mome.InvalidInputError, match="10 audio placeholder ids, 10 per clip"):
        model(input_ids=ids, input_features=torch.randn(2, 80, 100))
    with pytest.raises(mome.InvalidInputError, match="input_ids"):
        model(inputs_embeds=torch.randn(1, ids.shape[1], 64), input_features=torch.randn(1, 80, 100))


def with_video(**kwargs):
    """The tiny model with a video placeholder (one more embedding row, after ``<audio>``)."""
    text = dict(vocab_size=TINY_VOCAB_SIZE + 2)
    return tiny(video_token_id=TINY_VOCAB_SIZE + 1, text_overrides=text, **kwargs)


def video_prompt(model, videos=1, audios=0):
    ids = list(prompt(model, audios=audios, after=()))
    for _ in range(videos):
        ids += [model.config.video_token_id] * model.num_image_tokens + [19, 24]
    return ids + [17, 18, 9, 6, 8]


def test_a_video_is_its_frames_image_features_averaged():
    """Upstream's video tokens: each frame through CLIP and the projector (``encode_images``), then the mean over
    the frames; spliced at the video's placeholders, counted as image tokens by the routing report."""
    model = with_video().eval()
    videos = torch.randn(2, 3, 3, 32, 32)  # 2 videos of 3 frames
    ids = torch.tensor([video_prompt(model, videos=2, audios=1)])
    audio = digit_features(4)
    with torch.no_grad():
        frames = [model.model.get_image_features(pixel_values=v).pooler_output for v in videos]  # 3 x [16, 64]
        expected = torch.stack([torch.stack(list(f)).mean(0) for f in frames])  # [2, 16, 64]
        torch.testing.assert_close(model.get_video_features(videos), expected)
        out = model(input_ids=ids, pixel_values_videos=videos, input_features=audio).logits
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[ids == model.config.video_token_id] = expected.reshape(-1, 64)
        embeds[ids == model.config.audio_token_id] = model.get_audio_features(audio).reshape(-1, 64)
        by_hand = model.lm_head(model.language_model(inputs_embeds=embeds).last_hidden_state)
    torch.testing.assert_close(out, by_hand)
    modality = model.token_modality_ids(ids)[0]
    video = ids[0] == model.config.video_token_id
    assert set(modality[video].tolist()) == {model.modality_names.index("image")}
    assert model.config.video_token_id in model.generation_config.suppress_tokens
    kwargs = dict(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, input_features=audio)
    cached = model.generate(**kwargs, videos=videos, use_cache=True)
    assert torch.equal(cached, model.generate(**kwargs, pixel_values_videos=videos, use_cache=False))


def test_bad_video_is_a_typed_error_naming_the_expected_shape():
    model = with_video().eval()
    ids = torch.tensor([video_prompt(model)])
    with pytest.raises(mome.InvalidInputError, match=r"pixel_values_videos must be frames \[N_video, F, 3, 32, 32\]"):
        model(input_ids=ids, pixel_values_videos=torch.randn(1, 3, 32, 32))  # frames without the video axis
    with pytest.raises(mome.InvalidInputError, match="floating"):
        model(input_ids=ids, videos=torch.zeros(1, 2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(mome.InvalidInputError, match="16 video placeholder ids, 16 per video"):
        model(input_ids=ids, videos=torch.randn(2, 2, 3, 32, 32))
    with pytest.raises(mome.InvalidInputError, match="video_token_id is None"):
        tiny()(input_ids=torch.tensor([prompt(tiny())]), videos=torch.randn(1, 2, 3, 32, 32))
    with pytest.raises(mome.InvalidArgumentError, match="video_token_id"):
        tiny(video_token_id=TINY_IMAGE_TOKEN_ID)


# -- generation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("images, audios", [(1, 0), (0, 1), (1, 2)])
def test_generate_with_cache_equals_without(images, audios):
    model = tiny().eval()
    first, second = prompt(model, images=images, audios=audios), prompt(model, (1, 5), images=images, audios=audios)
    pad = len(first) - len(second)
    input_ids = torch.tensor([first, [0] * pad + second])
    attention_mask = torch.tensor([[1] * len(first), [0] * pad + [1] * len(second)])
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    kwargs["min_new_tokens"] = 6  # a random model may emit eos early: generate all 6 in both runs
    if images:
        kwargs["images"] = torch.randn(2 * images, 3, 32, 32)
    if audios:  # both names of the audio input
        kwargs["audios" if images else "input_features"] = digit_features(*range(2 * audios))
    cached = model.generate(**kwargs, use_cache=True)
    uncached = model.generate(**kwargs, use_cache=False)
    assert cached.shape == (2, input_ids.shape[1] + 6)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


# -- stages -----------------------------------------------------------------------------------------------------
def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def train_step(model, seed=0):
    """One AdamW step (weight decay on) over *all* parameters on a batch with an image and a clip in each sample;
    returns the parameters before the step."""
    torch.manual_seed(seed)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.tensor([prompt(model, images=1, audios=1)] * 2)
    labels = ids.masked_fill((ids == model.config.image_token_id) | (ids == model.config.audio_token_id), -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    optimizer.zero_grad(set_to_none=True)  # a new stage's run starts without the last stage's gradients
    model.train()
    loss = model(input_ids=ids, labels=labels, images=torch.randn(2, 3, 32, 32), audios=digit_features(4, 2)).loss
    loss.backward()
    optimizer.step()
    return before


def assert_only_trained_changed(model, before, expected):
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == expected  # every trainable tensor moved, every other one is bitwise unchanged


def test_stage1_trains_only_the_connectors():
    model = tiny(moe_layers="none")
    connectors = {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("model.multi_modal_projector.", "model.audio_projector."))
    }
    assert trainable(configure_stage(model, 1)) == connectors and len(connectors) == 8
    assert_only_trained_changed(model, train_step(model), connectors)
    image_only = trainable(configure_stage(model, 1, modality="image"))
    assert image_only == {n for n in connectors if "multi_modal_projector" in n}
    assert_only_trained_changed(model, train_step(model, seed=1), image_only)
    with pytest.raises(ValueError, match="modality"):
        configure_stage(model, 1, modality="video")


def test_stage2_trains_only_the_llm_ffns():
    model = tiny(moe_layers="none")
    ffns = {n for n, _ in model.named_parameters() if ".mlp." in n and n.startswith("model.language_model.layers.")}
    assert trainable(configure_stage(model, 2)) == ffns and len(ffns) == 4 * 3  # gate, up, down per layer
    assert_only_trained_changed(model, train_step(model), ffns)
    with pytest.raises(ValueError, match="upcycle"):
        configure_stage(model, 3)


def test_stage3_trains_expert_loras_routers_and_connectors():
    dense = tiny(moe_layers="none")
    model = copy.deepcopy(dense).upcycle("all", capacity_factor=None, eval_capacity_factor=None)
    with pytest.raises(ValueError, match="add_expert_lora"):
        configure_stage(model, 3)
    with pytest.raises(ValueError, match="dense model"):
        configure_stage(model, 2)
    adapted = add_expert_lora(model, init_lora_weights=False)  # B != 0: A gets a gradient at the first step
    assert adapted == [f"model.language_model.layers.{i}.mlp.experts" for i in range(4)]
    expected = {
        f"model.language_model.layers.{i}.mlp.{part}"
        for i in range(4)
        for part in (
            "router.proj.weight",
            "experts.lora_A.w_in",
            "experts.lora_B.w_in",
            "experts.lora_A.w_out",
            "experts.lora_B.w_out",
        )
    } | {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("model.multi_modal_projector.", "model.audio_projector."))
    }
    assert trainable(configure_stage(model, 3)) == expected
    assert_only_trained_changed(model, train_step(model), expected)


def test_modality_experts_come_from_the_stage2_models():
    base = tiny(moe_layers="none").eval()
    dense = [copy.deepcopy(base) for _ in range(4)]
    for e, model in enumerate(dense):
        with torch.no_grad():
            for layer in model.language_model.layers:
                layer.mlp.down_proj.weight.mul_(1 + e)  # four different "modality-specific" FFNs
    sparse = copy.deepcopy(base).upcycle("all", capacity_factor=None, eval_capacity_factor=None)
    sparse.load_modality_experts(dense)
    for index in range(4):
        experts = sparse.language_model.layers[index].mlp.experts
        for e in range(4):
            down = dense[e].language_model.layers[index].mlp.down_proj.weight
            torch.testing.assert_close(experts.w_out[e], down, rtol=0, atol=0)
    same = copy.deepcopy(base).upcycle("all", capacity_factor=None, eval_capacity_factor=None).eval()
    same.load_modality_experts([base] * 4)  # four equal experts with renormalised gates: the dense model
    add_expert_lora(same)  # B = 0: the LoRA starts as no change
    ids = torch.tensor([prompt(base, images=1, audios=1)])
    inputs = dict(input_ids=ids, images=torch.randn(1, 3, 32, 32), audios=digit_features(5))
    with torch.no_grad():
        torch.testing.assert_close(same(**inputs).logits, base(**inputs).logits, rtol=0, atol=1e-5)
    assert isinstance(same.language_model.layers[0].mlp, MoE)
    add_expert_lora(sparse, init_lora_weights=False)  # after the LoRAs, the experts' own weights are loaded
    sparse.load_modality_experts(dense[::-1])
    base_w_out = sparse.language_model.layers[1].mlp.experts.base_layer.w_out
    torch.testing.assert_close(base_w_out[0], dense[3].language_model.layers[1].mlp.down_proj.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="4 dense models"):
        sparse.load_modality_experts(dense[:2])
    with pytest.raises(ValueError, match="dense UniMoE"):
        sparse.load_modality_experts([sparse] * 4)


# -- saving -----------------------------------------------------------------------------------------------------
def test_save_pretrained_round_trip(tmp_path):
    model = tiny(llm="phi").eval()
    mome.save_pretrained(model, tmp_path / "mome")
    model.save_pretrained(tmp_path / "hf")
    ids = torch.tensor([prompt(model, images=1, audios=1)])
    inputs = dict(input_ids=ids, images=torch.randn(1, 3, 32, 32), audios=digit_features(8))
    for loaded in (mome.create_model(f"local-dir:{tmp_path / 'mome'}"), UniMoE.from_pretrained(tmp_path / "hf")):
        assert isinstance(loaded, UniMoE) and loaded.config.audio_pool_stride == 5
        assert loaded.generation_config.suppress_tokens == [model.config.image_token_id, model.config.audio_token_id]
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    decoder = aligned().eval()
    mome.save_pretrained(decoder, tmp_path / "aligned")
    loaded = mome.create_model(f"local-dir:{tmp_path / 'aligned'}").eval()
    assert loaded.config.audio_connector == "whisper_decoder" and loaded.num_audio_tokens == 6
    ids = torch.tensor([prompt(decoder, audios=1)])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, audios=digit_features(2)).logits,
            decoder(input_ids=ids, audios=digit_features(2)).logits,
            rtol=0,
            atol=0,
        )


def test_the_moe_llava_task_refuses_uni_moe():
    from mome.lit import TaskConfigError
    from mome.lit.llava import LLaVATask

    with pytest.raises(TaskConfigError, match="needs a MoE-LLaVA model, got UniMoE"):
        LLaVATask(model={"model_name": TINY, "moe_layers": "none"}, stage=1)
