"""V-MoE and Soft-MoE ViT families: timm contract, MoE placement, parameter counts, configs."""

from pathlib import Path

import pytest
import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from timm.models.vision_transformer import VisionTransformer

import mome
from mome.layers import MoE, SoftMoE

CONF_MODEL = Path(mome.conf_dir()) / "model"
VISION_CONFIGS = sorted(p.name for p in CONF_MODEL.glob("*.yaml") if p.name.startswith(("vmoe_", "soft_moe_vit_")))


def moe_blocks(model):
    return [i for i, block in enumerate(model.blocks) if isinstance(block.mlp, (MoE, SoftMoE))]


def test_variants_are_registered():
    assert mome.list_models("vmoe_*") == ["vmoe_b16_e8", "vmoe_l16_e8", "vmoe_s32_e8", "vmoe_tiny_patch8_e4"]
    assert "soft_moe_vit_base_patch16_224_e128" in mome.list_models("soft_moe_vit_*")


def test_moe_placement_matches_upstream():
    with torch.device("meta"):
        s32 = mome.create_model("vmoe_s32_e8")
        b16 = mome.create_model("vmoe_b16_e8")
        soft_b = mome.create_model("soft_moe_vit_base_patch16_224_e128")
        soft_h = mome.create_model("soft_moe_vit_huge_patch14_224_e256")
    assert moe_blocks(s32) == [5, 7] and len(s32.blocks) == 8
    assert moe_blocks(b16) == [1, 3, 5, 7, 9, 11]
    assert moe_blocks(soft_b) == list(range(6, 12)) and soft_b.blocks[6].mlp.num_experts == 128
    assert moe_blocks(soft_h) == list(range(16, 32)) and soft_h.blocks[16].mlp.num_experts == 256
    router = b16.blocks[1].mlp.router
    assert router.top_k == 2 and router.noise_std == 1.0 and not router.renormalize
    assert b16.blocks[1].mlp.capacity(8 * 197) == 416  # ceil(8*197*2*1.05/8) -> multiple of 4


def dense_count(**vit_kwargs):
    with torch.device("meta"):
        return sum(p.numel() for p in VisionTransformer(**vit_kwargs).parameters())


def test_parameter_counts_from_the_dense_vit():
    with torch.device("meta"):
        b16 = mome.create_model("vmoe_b16_e8")
        soft_s = mome.create_model("soft_moe_vit_small_patch16_224_e128")
    d, h = 768, 3072
    mlp = d * h + h + h * d + d
    expected = dense_count(patch_size=16, embed_dim=768, depth=12, num_heads=12) + 6 * (7 * mlp + d * 8)
    assert sum(p.numel() for p in b16.parameters()) == expected
    d, h = 384, 1536
    mlp = d * h + h + h * d + d
    dense = dense_count(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, class_token=False, global_pool="avg", qk_norm=True
    )
    assert sum(p.numel() for p in soft_s.parameters()) == dense + 6 * (127 * mlp + d * 128 + 1)
    with torch.device("meta"):
        dense_b16 = timm.create_model("vit_base_patch16_224", pretrained=False)
    assert abs(sum(p.numel() for p in dense_b16.parameters()) - 86.57e6) < 0.01e6  # sanity: timm's ViT-B/16


@pytest.mark.parametrize("router", ["noisy_top_k", "top_k", "expert_choice", "hash"])
def test_tiny_vmoe_trains_with_every_router(router):
    moe_kwargs = {} if router != "hash" else {"aux_loss_weights": {}}
    model = mome.create_model("vmoe_tiny_patch8_e4", router=router, moe_kwargs=moe_kwargs)
    images = torch.randn(2, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (2, 10)
    losses = mome.aux_losses(model)
    if router in ("noisy_top_k", "top_k"):
        assert "importance" in losses and all(torch.isfinite(v) for v in losses.values())
    (logits.logsumexp(-1).mean() + sum(losses.values())).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" in n)


def test_tiny_soft_moe_vit_trains_and_follows_timm_contract():
    model = mome.create_model("soft_moe_vit_tiny_patch8_e8")
    images = torch.randn(3, 3, 32, 32)
    features = model.forward_features(images)
    assert features.shape == (3, 16, 64)  # no class token: 16 patches
    assert model.forward_head(features, pre_logits=True).shape == (3, model.num_features)
    model.reset_classifier(5)
    assert model(images).shape == (3, 5)
    model.set_grad_checkpointing(True)
    model(images).sum().backward()
    assert model.blocks[3].mlp.mu.grad is not None
    assert mome.aux_losses(model) == {}
    assert set(mome.routing_stats(model)) == {"blocks.2.mlp", "blocks.3.mlp"}


def test_token_groups_and_mixing_parts():
    model = mome.create_model("vmoe_tiny_patch8_e4", group_size_images=2)
    assert model.blocks[1].mlp.group_size == 2 * 17
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    with pytest.raises(ValueError, match="group_size"):
        model(torch.randn(3, 3, 32, 32))
    soft = mome.create_model("vmoe_tiny_patch8_e4", moe_type="soft")  # a V-MoE with Soft MoE FFNs
    assert isinstance(soft.blocks[1].mlp, SoftMoE)
    shared = mome.create_model("vmoe_tiny_patch8_e4", moe_kwargs={"num_shared_experts": 1})
    assert shared.blocks[1].mlp.shared_experts is not None
    with pytest.raises(ValueError, match="moe_layers"):
        mome.create_model("vmoe_tiny_patch8_e4", moe_layers="sometimes")


def test_dense_timm_vit_loads_strictly_into_non_moe_parameters_and_upcycles():
    dense = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10, act_layer="gelu_tanh"
    ).eval()
    moe = mome.create_model(
        "vmoe_tiny_patch8_e4",
        router="top_k",
        upcycle=False,
        moe_kwargs={"renormalize": True, "capacity_factor": None, "aux_loss_weights": {}},
    ).eval()
    dense_state = dense.state_dict()
    moe_mlp_prefixes = tuple(f"blocks.{i}.mlp." for i in moe.moe_layer_indices)
    shared_state = {k: v for k, v in dense_state.items() if not k.startswith(moe_mlp_prefixes)}
    missing, unexpected = moe.load_state_dict(shared_state, strict=False)
    assert unexpected == []
    assert all(k.startswith(moe_mlp_prefixes) for k in missing)
    assert set(moe.state_dict()) - set(missing) == set(shared_state)
    # Upcycled: every expert a copy of the dense MLP -> the same logits (dropless, renormalised top-k).
    upcycled = mome.create_model(
        "vmoe_tiny_patch8_e4",
        router="top_k",
        upcycle=True,
        moe_kwargs={"renormalize": True, "capacity_factor": None, "aux_loss_weights": {}},
    )
    upcycled.load_state_dict(shared_state, strict=False)
    for i in upcycled.moe_layer_indices:
        dense_mlp = dense.blocks[i].mlp
        upcycled.blocks[i].mlp.experts.load_state_dict(
            type(upcycled.blocks[i].mlp.experts).from_dense(dense_mlp, 4).state_dict()
        )
    upcycled.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (upcycled(images) - dense(images)).abs().max() < 1e-5


@pytest.mark.parametrize("name", VISION_CONFIGS)
def test_model_configs_instantiate(name):
    cfg = OmegaConf.load(CONF_MODEL / name)
    if "tiny" in name:
        model = instantiate(cfg)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    else:
        with torch.device("meta"):
            model = instantiate(cfg)
    assert moe_blocks(model)
    overridden = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["num_experts=16", "moe_layers=every_2"]))
    with torch.device("meta"):
        model = instantiate(overridden)
    assert moe_blocks(model) == list(range(1, len(model.blocks), 2))
    assert model.blocks[1].mlp.num_experts == 16


def test_pretrained_cfg_feeds_timm_data_pipeline():
    model = mome.create_model("vmoe_tiny_patch8_e4")
    data_cfg = timm.data.resolve_model_data_config(model)
    assert data_cfg["input_size"] == (3, 32, 32) and data_cfg["mean"] == (0.5, 0.5, 0.5)
    transform = timm.data.create_transform(**data_cfg)
    from PIL import Image

    tensor = transform(Image.new("RGB", (50, 40), color=(255, 0, 0)))
    assert tensor.shape == (3, 32, 32)
    torch.testing.assert_close(tensor[0].max(), torch.tensor(1.0))  # red channel at 255 -> +1
    overlay = mome.create_model("vmoe_tiny_patch8_e4", pretrained_cfg_overlay={"crop_pct": 0.9})
    assert overlay.pretrained_cfg.crop_pct == 0.9 and overlay.pretrained_cfg.mean == (0.5, 0.5, 0.5)


def test_vmoe_with_modality_aware_experts():
    model = mome.create_model("vmoe_tiny_patch8_e4", moe_type="modality_pools", num_experts=4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    load = mome.routing_stats(model)["blocks.1.mlp"]["expert_load_per_modality"]
    assert load[0, :2].sum() > 0.99 and load[1].sum() == 0  # image tokens use the image pool only
    assert model.blocks[1].mlp.shared_experts is not None
