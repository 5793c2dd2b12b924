"""LIMoE: one shared MoE tower for images and text, open_clip contract, tokenizer, parameter counts, configs."""

import math
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

import mome
import mome.models.limoe  # noqa: F401  (registers the LIMoE variants)
from mome import get_tokenizer
from mome._tokenizer import HFTokenizer, create_tokenizer
from mome.layers import ModalityMoE, MoE, SoftMoE, SparseMoE
from mome.models.limoe import LIMOE_MOE_DEFAULTS, LIMoE

TINY = "limoe_tiny_patch8_e4"
CONF_MODEL = Path(mome.conf_dir()) / "model"
LIMOE_CONFIGS = sorted(p.name for p in CONF_MODEL.glob("limoe_*.yaml"))
CAPTIONS = ["a photo of a cat", "a dog"]


@pytest.fixture(scope="module")
def tokens():
    return get_tokenizer(TINY)(CAPTIONS)


def moe_blocks(model):
    return [i for i, block in enumerate(model.blocks) if isinstance(block.mlp, (MoE, SoftMoE))]


def test_variants_are_registered_without_weights():
    assert mome.list_models("limoe_*") == [
        "limoe_audio_tiny_patch8_e4",
        "limoe_b16_e8",
        "limoe_l16_e32",
        "limoe_tiny_patch8_e4",
    ]
    assert mome.list_pretrained("limoe_*") == []  # LIMoE checkpoints were never released
    with pytest.raises(ValueError, match="no pretrained weights"):
        mome.create_model(TINY, pretrained=True)


def expected_count(*, img, patch, width, depth, experts, moe_blocks, embed_dim, vocab=49408, context=16):
    """Independent count: embeddings + blocks (attention, norms, MLP) + extra experts and routers + heads."""
    d, h = width, 4 * width
    embeddings = 3 * patch * patch * d + d + (img // patch) ** 2 * d + vocab * d + context * d
    mlp = d * h + h + h * d + d
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + mlp
    moe_extra = moe_blocks * ((experts - 1) * mlp + d * experts)  # router: no bias
    heads = 2 * (2 * d + d * embed_dim + embed_dim)
    return embeddings + depth * block + moe_extra + heads + 1  # + logit_scale


def test_parameter_counts_on_meta():
    with torch.device("meta"):
        b16 = mome.create_model("limoe_b16_e8")
        l16 = mome.create_model("limoe_l16_e32")
    assert moe_blocks(b16) == list(range(1, 12, 2)) and moe_blocks(l16) == list(range(1, 24, 2))
    b16_count = sum(p.numel() for p in b16.parameters())
    l16_count = sum(p.numel() for p in l16.parameters())
    assert b16_count == expected_count(img=224, patch=16, width=768, depth=12, experts=8, moe_blocks=6, embed_dim=768)
    assert l16_count == expected_count(
        img=224, patch=16, width=1024, depth=24, experts=32, moe_blocks=12, embed_dim=1024
    )
    assert b16_count == 323_316_481 and l16_count == 3_478_871_041


def test_router_and_capacity_defaults():
    with torch.device("meta"):
        b16 = mome.create_model("limoe_b16_e8")
    moe = b16.blocks[1].mlp
    assert isinstance(moe, SparseMoE) and moe.num_modalities == 2
    router = moe.router
    assert router.top_k == 1 and router.noise_std == 1.0 and router.batch_priority and not router.renormalize
    assert moe.capacity(8 * (196 + 16)) == 212  # ceil(1696 * 1 * 1.0 / 8) = 212, a multiple of 4
    assert moe.aux_loss_weights == LIMOE_MOE_DEFAULTS["aux_loss_weights"]
    assert moe.global_entropy_threshold == pytest.approx(math.log(2))


def test_tiny_forward_backward_losses_and_stats(tokens):
    model = mome.create_model(TINY)
    images = torch.randn(2, 3, 32, 32)
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    image_features, text_features, scale = model(images, tokens)
    assert image_features.shape == text_features.shape == (2, 64)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(scale, torch.tensor(1 / 0.07))

    losses = mome.aux_losses(model)
    assert {"importance", "load", "local_entropy", "global_entropy"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    stats = mome.routing_stats(model)
    assert set(stats) == {"blocks.1.mlp", "blocks.3.mlp"}
    for layer_stats in stats.values():
        load = layer_stats["expert_load_per_modality"]  # [2, E], rows sum to 1 when a modality was routed
        assert load.shape == (2, 4)
        torch.testing.assert_close(load.sum(-1), torch.ones(2))

    logits = scale * image_features @ text_features.T
    labels = torch.arange(2)
    clip_loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    (clip_loss + sum(losses.values())).backward()
    for name in ("blocks.1.mlp.experts.w_in", "blocks.3.mlp.router.proj.weight", "patch_embed.proj.weight"):
        assert model.get_parameter(name).grad is not None, name
    assert model.pos_embed.grad.abs().sum() > 0 and model.positional_embedding.grad.abs().sum() > 0
    assert model.token_embedding.weight.grad.abs().sum() > 0 and model.logit_scale.grad is not None

    model.eval()  # no router noise: no load loss
    model(images, tokens)
    assert "load" not in mome.aux_losses(model)


def test_streams_alone_match_the_joint_pass_and_padding_is_inert(tokens):
    # Dropless, no noise: each token's output is independent of the other tokens routed with it.
    model = mome.create_model(TINY, moe_kwargs={"capacity_factor": None}).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        image_features, text_features, _ = model(images, tokens)
        torch.testing.assert_close(model.encode_image(images, normalize=True), image_features)
        torch.testing.assert_close(model.encode_text(tokens, normalize=True), text_features)
        # Padding keys are masked and padding tokens skip the MoE: trailing padding changes nothing.
        torch.testing.assert_close(model.encode_text(tokens[:, :8]), model.encode_text(tokens))
        for block in model.blocks:  # timm's unfused attention path takes the same boolean mask
            block.attn.fused_attn = False
        torch.testing.assert_close(model.encode_text(tokens, normalize=True), text_features)
        for block in model.blocks:
            block.attn.fused_attn = True
        stats = mome.routing_stats(model)["blocks.1.mlp"]
        load = stats["expert_load_per_modality"]
        assert load[0].sum() == 0 and load[1].sum() == pytest.approx(1.0)  # text stream alone: modality 1 only
        routed = model.route_padding
        model.route_padding = True
        changed = model.encode_text(tokens)
        model.route_padding = routed
    assert changed.shape == (2, 64)
    with pytest.raises(ValueError, match="context_length=16"):
        model.encode_text(torch.ones(1, 17, dtype=torch.long))


def test_open_clip_contract_and_zero_shot_helper(tokens):
    model = mome.create_model(TINY, output_dict=True).eval()
    tok = get_tokenizer(TINY)
    classifier = open_clip.build_zero_shot_classifier(
        model,
        tokenizer=tok,
        classnames=["cat", "dog"],
        templates=[lambda c: f"a photo of a {c}."],
        device="cpu",
        use_tqdm=False,
    )
    assert classifier.shape == (64, 2)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(2))
    out = model(torch.randn(2, 3, 32, 32), tokens)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    only_text = model(text=tokens)
    assert only_text["image_features"] is None and only_text["text_features"].shape == (2, 64)

    cfg = model.pretrained_cfg
    assert cfg.mean == open_clip.OPENAI_DATASET_MEAN and cfg.std == open_clip.OPENAI_DATASET_STD
    assert (cfg.input_size, cfg.interpolation, cfg.crop_pct) == ((3, 32, 32), "bicubic", 1.0)
    assert cfg.context_length == 16 and cfg.tokenizer.startswith("open_clip:")
    data_cfg = timm.data.resolve_model_data_config(model)
    assert data_cfg["input_size"] == (3, 32, 32) and data_cfg["interpolation"] == "bicubic"


def test_tokenizer_is_open_clips_clip_bpe(tmp_path):
    tok = get_tokenizer(TINY)
    reference = open_clip.SimpleTokenizer(context_length=16)
    assert torch.equal(tok(CAPTIONS), reference(CAPTIONS))
    assert get_tokenizer(TINY, context_length=8)(CAPTIONS).shape == (2, 8)
    # A saved folder carries its card, tokenizer included.
    model = mome.create_model(TINY)
    mome.save_pretrained(model, tmp_path / "tiny")
    assert torch.equal(get_tokenizer(f"local-dir:{tmp_path / 'tiny'}")(CAPTIONS), reference(CAPTIONS))


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no text side"):
        get_tokenizer("vmoe_tiny_patch8_e4")
    with pytest.raises(mome.InvalidArgumentError, match="tokenizer must be .<kind>:<name>. with a kind of"):
        create_tokenizer("sentencepiece:spm.model")
    # A Hub tokenizer (VLMo's bert-base-uncased) must already be in the cache: offline, a clear error.
    with pytest.raises(mome.PretrainedUnavailableError, match="hf download bert-base-uncased"):
        create_tokenizer("bert-base-uncased", 40, cache_dir=tmp_path)


def test_hf_tokenizer_wrapper_has_open_clips_call():
    class Fake:  # stands in for a transformers tokenizer
        def __call__(self, texts, truncation, max_length, return_tensors, padding):
            assert truncation and return_tensors == "pt" and padding == "max_length"
            return {"input_ids": torch.arange(len(texts) * max_length).view(len(texts), max_length).int()}

    ids = HFTokenizer(Fake(), context_length=5)("one text")
    assert ids.shape == (1, 5) and ids.dtype == torch.long


def test_mixing_parts():
    images, text = torch.randn(2, 3, 32, 32), get_tokenizer(TINY)(CAPTIONS)
    soft = mome.create_model(TINY, moe_type="soft")  # LIMoE with Soft MoE FFNs, run per modality
    assert isinstance(soft.blocks[1].mlp, SoftMoE)
    image_features, text_features, _ = soft(images, text)
    assert image_features.shape == text_features.shape == (2, 64) and mome.aux_losses(soft) == {}
    with pytest.raises(ValueError, match="Soft MoE layer.*moe_kwargs configure sparse layers"):
        mome.create_model(TINY, moe_type="soft", moe_kwargs={"capacity_factor": 2.0})

    pools = mome.create_model(TINY, moe_type="modality_pools")  # 2 image + 2 text experts + 1 shared
    layer = pools.blocks[1].mlp
    assert isinstance(layer, ModalityMoE) and layer.shared_experts is not None
    pools(images, text)
    load = mome.routing_stats(pools)["blocks.1.mlp"]["expert_load_per_modality"]
    assert load[0, 2:].sum() == 0 and load[1, :2].sum() == 0  # each modality stays in its pool

    ec = mome.create_model(TINY, router="expert_choice")
    ec(images, text)
    assert "importance" in mome.aux_losses(ec)
    dense = mome.create_model(TINY, moe_layers="none")  # a dense one-tower baseline
    assert moe_blocks(dense) == [] and dense(images, text)[0].shape == (2, 64)


@pytest.mark.parametrize("name", LIMOE_CONFIGS)
def test_model_configs_instantiate(name):
    cfg = OmegaConf.load(CONF_MODEL / name)
    if "tiny" in name:
        model = instantiate(cfg)
        text = get_tokenizer(cfg.model_name)(CAPTIONS)
        assert model(torch.randn(2, 3, 32, 32), text)[0].shape == (2, 64)
    else:
        with torch.device("meta"):
            model = instantiate(cfg)
    assert isinstance(model, LIMoE) and moe_blocks(model) == list(range(1, len(model.blocks), 2))
    if "tiny" not in name:
        return
    for override, check in (
        ("num_experts=16", lambda m: m.blocks[1].mlp.num_experts == 16),
        ("router=expert_choice", lambda m: type(m.blocks[1].mlp.router).__name__ == "ExpertChoiceRouter"),
        ("moe_type=soft", lambda m: isinstance(m.blocks[1].mlp, SoftMoE)),
        ("moe_type=modality_pools", lambda m: isinstance(m.blocks[1].mlp, ModalityMoE)),
    ):
        model = instantiate(OmegaConf.merge(cfg, OmegaConf.from_dotlist([override])))
        assert check(model), override
        model(torch.randn(2, 3, 32, 32), get_tokenizer(TINY)(CAPTIONS))


def test_open_clip_text_transformer_loads_into_the_text_path():
    from open_clip.transformer import TextTransformer

    from mome.models.limoe import limoe_state_dict_from_open_clip_text

    text_tower = TextTransformer(context_length=77, vocab_size=49408, width=64, heads=4, layers=4, output_dim=64)
    for param in text_tower.parameters():
        torch.nn.init.normal_(param, std=0.1)
    model = mome.create_model("limoe_tiny_patch8_e4")
    mapped = limoe_state_dict_from_open_clip_text(text_tower.state_dict(), model)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert unexpected == []
    assert all(
        k.startswith(("pos_embed", "patch_embed", "image_", "logit_scale", "text_proj.bias")) or ".router." in k
        for k in missing
    ), missing
    torch.testing.assert_close(model.text_proj.weight, text_tower.text_projection.t())
    torch.testing.assert_close(model.positional_embedding, text_tower.positional_embedding[:16])
    moe_block = model.blocks[model.moe_layer_indices[0]]
    source = text_tower.transformer.resblocks[model.moe_layer_indices[0]]
    for e in range(moe_block.mlp.experts.num_experts):
        torch.testing.assert_close(moe_block.mlp.experts.w_in[e], source.mlp.c_fc.weight)
    # The attention layouts correspond: the same input gives the same (unmasked) attention output.
    x = torch.randn(2, 5, 64)
    expected = source.attn(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(moe_block.attn(x), expected, atol=1e-5, rtol=1e-5)
    bad = dict(text_tower.state_dict(), extra=torch.zeros(1))
    with pytest.raises(ValueError, match="extra"):
        limoe_state_dict_from_open_clip_text(bad, model)
