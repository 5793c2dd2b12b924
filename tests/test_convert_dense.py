"""Dense checkpoints into MoE models: timm ViT -> V-MoE / Soft-MoE ViT, open_clip CLIP -> LIMoE."""

import pytest
import timm
import torch
from safetensors.torch import save_file

import mome
from mome.convert import CONVERTERS, OPEN_CLIP_NO_COUNTERPART, load_converted
from mome.models import MoEVisionTransformer
from mome.models.limoe import LIMoE

VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)


def dense_vit(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**VIT, **kwargs}).eval()


def moe_vit(**kwargs):
    args = dict(num_experts=4, top_k=2, moe_layers="every_2", router="top_k", moe_kwargs={"renormalize": True})
    return MoEVisionTransformer(**{**VIT, **args, **kwargs}).eval()


def tiny_clip():
    from open_clip.model import CLIP

    vision = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16)
    text = dict(context_length=16, vocab_size=100, width=64, heads=4, layers=2)
    return CLIP(32, vision_cfg=vision, text_cfg=text).eval()


def tiny_limoe(**kwargs):
    args = dict(img_size=32, patch_size=8, width=64, depth=2, num_heads=4, embed_dim=32, vocab_size=100)
    return LIMoE(**{**args, "context_length": 16, "num_experts": 4, "moe_layers": [1], "act_layer": "gelu", **kwargs})


def test_timm_vit_fills_every_expert_and_keeps_the_router(tmp_path):
    dense = dense_vit()
    save_file(dense.state_dict(), tmp_path / "vit.safetensors")
    model = moe_vit()
    router = model.blocks[1].mlp.router.proj.weight.detach().clone()
    model.load_state_dict(load_converted(tmp_path / "vit.safetensors", "timm", "timm_vit", model), strict=True)
    experts = model.blocks[1].mlp.experts
    for e in range(4):
        torch.testing.assert_close(experts.w_in[e], dense.blocks[1].mlp.fc1.weight, rtol=0, atol=0)
        torch.testing.assert_close(experts.b_out[e], dense.blocks[1].mlp.fc2.bias, rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[1].mlp.router.proj.weight, router, rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[0].mlp.fc1.weight, dense.blocks[0].mlp.fc1.weight, rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max() < 1e-5  # dropless, renormalised top-k: the dense function


def test_timm_vit_into_soft_moe_keeps_slots_at_init():
    dense = dense_vit()
    model = moe_vit(moe_type="soft", moe_layers="last_half", moe_kwargs=None)
    mu = model.blocks[3].mlp.mu.detach().clone()
    converted = CONVERTERS["timm_vit"](dense.state_dict(), model)
    torch.testing.assert_close(converted["blocks.3.mlp.mu"], mu, rtol=0, atol=0)
    torch.testing.assert_close(converted["blocks.3.mlp.experts.w_out"][2], dense.blocks[3].mlp.fc2.weight)


def test_timm_vit_position_embedding_is_resampled():
    from timm.layers import resample_abs_pos_embed

    dense = dense_vit()
    converted = CONVERTERS["timm_vit"](dense.state_dict(), moe_vit(img_size=48))
    expected = resample_abs_pos_embed(dense.pos_embed.detach(), [6, 6], num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(converted["pos_embed"], expected)


def test_timm_vit_mismatches_are_named():
    state = dense_vit().state_dict()
    with pytest.raises(mome.CheckpointMismatchError, match=r"checkpoint lacks: .*blocks\.4\.norm1\.weight"):
        CONVERTERS["timm_vit"](state, moe_vit(depth=6))
    with pytest.raises(mome.CheckpointMismatchError, match="no counterpart in the model: head_dist.weight"):
        CONVERTERS["timm_vit"]({**state, "head_dist.weight": torch.zeros(10, 64)}, moe_vit())
    with pytest.raises(mome.CheckpointMismatchError, match=r"head\.weight .*\(1000, 64\) vs model \(10, 64\)"):
        CONVERTERS["timm_vit"](dense_vit(num_classes=1000).state_dict(), moe_vit())


def test_open_clip_into_limoe_maps_both_towers(tmp_path):
    clip = tiny_clip()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    model = tiny_limoe()
    with pytest.raises(mome.CheckpointMismatchError, match="visual.class_embedding"):
        load_converted(tmp_path / "clip.pt", "open_clip", "open_clip", model)
    router = model.blocks[1].mlp.router.proj.weight.detach().clone()
    state = load_converted(
        tmp_path / "clip.pt", "open_clip", "open_clip", model, ignore_prefixes=OPEN_CLIP_NO_COUNTERPART
    )
    model.load_state_dict(state, strict=True)
    visual = clip.visual
    torch.testing.assert_close(model.pos_embed[0], visual.positional_embedding[1:])
    torch.testing.assert_close(model.patch_embed.proj.weight, visual.conv1.weight)
    torch.testing.assert_close(model.image_proj.weight, visual.proj.t())
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, visual.transformer.resblocks[0].attn.in_proj_weight)
    for e in range(4):
        torch.testing.assert_close(model.blocks[1].mlp.experts.w_in[e], visual.transformer.resblocks[1].mlp.c_fc.weight)
    torch.testing.assert_close(model.blocks[1].mlp.router.proj.weight, router)
    torch.testing.assert_close(model.token_embedding.weight, clip.token_embedding.weight)
    torch.testing.assert_close(model.text_proj.weight, clip.text_projection.t())
    assert torch.all(model.patch_embed.proj.bias == 0)


def test_open_clip_shared_blocks_from_the_text_tower():
    clip = tiny_clip()
    state = CONVERTERS["open_clip"](
        clip.state_dict(), tiny_limoe(), ignore_prefixes=OPEN_CLIP_NO_COUNTERPART, shared_blocks_from="text"
    )
    torch.testing.assert_close(state["blocks.0.norm1.weight"], clip.transformer.resblocks[0].ln_1.weight)
    torch.testing.assert_close(state["blocks.1.mlp.experts.b_in"][3], clip.transformer.resblocks[1].mlp.c_fc.bias)


def test_open_clip_width_mismatch_is_reported():
    with pytest.raises(mome.CheckpointMismatchError, match="does not map onto this LIMoE"):
        CONVERTERS["open_clip"](
            tiny_clip().state_dict(), tiny_limoe(width=32, num_heads=2), ignore_prefixes=OPEN_CLIP_NO_COUNTERPART
        )


def test_open_clip_into_an_upcycled_clip_fills_every_expert_and_names_bad_keys():
    clip = tiny_clip()
    model = mome.create_model(
        "upcycled_open_clip",
        model_cfg=dict(
            embed_dim=32,
            vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
            text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=4, layers=2),
        ),
        num_experts=4,
    )
    router = model.transformer.resblocks[1].mlp.router.proj.weight.detach().clone()
    state = CONVERTERS["open_clip"](clip.state_dict(), model)
    for e in range(4):
        assert torch.equal(
            state["transformer.resblocks.1.mlp.experts.w_out"][e], clip.transformer.resblocks[1].mlp.c_proj.weight
        )
    assert torch.equal(state["transformer.resblocks.1.mlp.router.proj.weight"], router)  # the router keeps its init
    assert torch.equal(state["visual.class_embedding"], clip.visual.class_embedding)
    broken = {k: v for k, v in clip.state_dict().items() if k != "visual.transformer.resblocks.1.mlp.c_fc.bias"}
    with pytest.raises(
        mome.CheckpointMismatchError, match=r"lacks: visual\.transformer\.resblocks\.1\.mlp\.c_fc\.bias"
    ):
        CONVERTERS["open_clip"](broken, model)
