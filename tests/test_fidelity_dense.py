"""Fidelity of sparse upcycling to the dense upstream models: timm ViTs and an open_clip CLIP written by
the upstream code itself (``tools/upstream_dense.py``; ``tests/data/upstream/{timm_vit_tiny,
timm_vit_tiny_gap,open_clip_tiny}``), loaded through the public routes
(``create_model(arch, checkpoint_path=FILE, checkpoint_format="timm"|"open_clip")`` and the zoo cards with
``pretrained_cfg_overlay=dict(file=FILE)``) into mome's MoE models at tiny size.

An upcycled model computes the dense function when every token's combine weights sum to one and no token
is dropped: the V-MoE cards are therefore checked with a renormalised top-k router and no capacity limit
(``router="top_k"``, ``renormalize=True``, ``capacity_factor=None``). With the cards' own V-MoE routing
(top-2 probabilities not renormalised, capacity 1.05) the upcycled model is an initialisation and differs
from the dense one; that is not a fidelity claim. A Soft MoE layer mixes the tokens of an image into slots,
so an upcycled Soft-MoE ViT is not the dense function either: its cards are checked (a) with
``moe_layers="none"``, where every output must equal timm's (patch embedding, class token, attention,
norms, pooling, head: the mapping of every non-expert weight), and (b) with the card's Soft MoE layers,
where the blocks before the first MoE block must equal timm's and every expert must be a bitwise copy of
the dense MLP it replaces.

All diffs are fp32 max abs differences (outputs up to about 15 in size).
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from fidelity import FidelityCase, fixture_dir, max_abs_diff
from safetensors.torch import load_file, save_file

import mome
from mome.convert import OPEN_CLIP_NO_COUNTERPART

TIMM = "timm_vit_tiny"
TIMM_GAP = "timm_vit_tiny_gap"
OPEN_CLIP = "open_clip_tiny"
#: the width/depth of the fixtures; the cards' model_kwargs give every other option
TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10, num_experts=4)
#: the routing under which an upcycled sparse MoE is the dense function (weights sum to 1, nothing dropped)
DENSE_ROUTING = dict(
    router="top_k",
    group_size_images=None,
    moe_kwargs=dict(renormalize=True, capacity_factor=None, eval_capacity_factor=None),
)
VMOE_CARDS = ("vmoe_b16_e8.augreg_in21k_upcycled", "vmoe_l16_e8.augreg_in21k_upcycled")
SOFT_CARDS = tuple(f"soft_moe_vit_{size}_patch16_224_e128.augreg_in21k_upcycled" for size in ("small", "base", "large"))


def fixture(folder: str) -> tuple[dict, dict, dict]:
    """``(inputs, outputs, the upstream writer's config.json)`` of a fixture folder."""
    path = fixture_dir(folder)
    config = path / ("open_clip_config.json" if folder.startswith("open_clip") else "config.json")
    return (
        load_file(path / "inputs.safetensors"),
        load_file(path / "outputs.safetensors"),
        json.loads(config.read_text()),
    )


def weights(folder: str) -> str:
    name = "open_clip_model.safetensors" if folder.startswith("open_clip") else "model.safetensors"
    return str(fixture_dir(folder) / name)


def vit_outputs(model, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs timm's forward produced, computed by ``model`` (a timm-contract ViT)."""
    with torch.no_grad():
        features = model.forward_features(image)
        out = {
            "logits": model(image),
            "features": features,
            "pre_logits": model.forward_head(features, pre_logits=True),
        }
        blocks = model.forward_intermediates(
            image, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
        )
    for i, block in enumerate(blocks):
        patches, prefix = block if isinstance(block, tuple) else (block, None)
        out[f"block{i}"] = patches
        if prefix is not None:
            out[f"block{i}_prefix"] = prefix
    return out


def diffs(ours: dict, theirs: dict, names=None) -> dict[str, float]:
    return {name: max_abs_diff(ours[name], theirs[name]) for name in (names or theirs)}


def compare_vit(folder: str, build) -> dict[str, float]:
    inputs, outputs, _ = fixture(folder)
    model = build().eval()
    return diffs(vit_outputs(model, inputs["image"]), outputs)


def compare_soft_moe_card(card: str) -> dict[str, float]:
    """(b) of the module docstring: the blocks before the first Soft MoE block, and the copied experts."""
    inputs, outputs, _ = fixture(TIMM)
    model = mome.create_model(card, pretrained=True, pretrained_cfg_overlay=dict(file=weights(TIMM)), **TINY_VIT)
    model.eval()
    first = model.moe_layer_indices[0]
    assert first > 0, "the card's first MoE block must leave a dense block to compare"
    before = [name for name in outputs if name.startswith("block") and int(name[5:].split("_")[0]) < first]
    result = diffs(vit_outputs(model, inputs["image"]), outputs, before)
    dense = load_file(weights(TIMM))
    for index in model.moe_layer_indices:
        experts = model.blocks[index].mlp.experts
        for ours, theirs in (
            ("w_in", "fc1.weight"),
            ("b_in", "fc1.bias"),
            ("w_out", "fc2.weight"),
            ("b_out", "fc2.bias"),
        ):
            copy = dense[f"blocks.{index}.mlp.{theirs}"].expand_as(getattr(experts, ours))
            result[f"blocks.{index}.experts.{ours}"] = max_abs_diff(getattr(experts, ours).detach(), copy)
    return result


def compare_open_clip() -> dict[str, float]:
    inputs, outputs, config = fixture(OPEN_CLIP)
    model = mome.create_model(
        "upcycled_open_clip",
        checkpoint_path=weights(OPEN_CLIP),
        checkpoint_format="open_clip",
        model_cfg=config["model_cfg"],
        num_experts=4,
    ).eval()
    with torch.no_grad():
        image_features, text_features, scale = model(inputs["image"], inputs["text"])
        ours = {
            "image_embedding": model.encode_image(inputs["image"]),
            "text_embedding": model.encode_text(inputs["text"]),
            "image_features": image_features,
            "text_features": text_features,
            "logit_scale": scale.reshape(1),
        }
    return diffs(ours, outputs)


def timm_route(folder: str, arch: str, **kwargs):
    """``create_model(arch, checkpoint_path=<timm file>, checkpoint_format="timm", **kwargs)``."""
    return mome.create_model(arch, checkpoint_path=weights(folder), checkpoint_format="timm", **kwargs)


def card_route(card: str, **kwargs):
    """``create_model(card, pretrained=True, pretrained_cfg_overlay=dict(file=<timm file>), **tiny, **kwargs)``."""
    return mome.create_model(
        card, pretrained=True, pretrained_cfg_overlay=dict(file=weights(TIMM)), **TINY_VIT, **kwargs
    )


def timm_model_args(folder: str) -> dict:
    return fixture(folder)[2]["model_args"]  # what timm.create_model was given (timm's config.json)


CASES: list[FidelityCase] = [
    FidelityCase(
        "timm ViT (cls token) -> upcycled_timm_vit, checkpoint_format=timm, fp32",
        TIMM,
        lambda: compare_vit(
            TIMM, lambda: timm_route(TIMM, "upcycled_timm_vit", **timm_model_args(TIMM), num_experts=4)
        ),
    ),
    FidelityCase(
        "timm ViT (GAP, QK-norm, tanh GELU) -> upcycled_timm_vit, checkpoint_format=timm, fp32",
        TIMM_GAP,
        lambda: compare_vit(
            TIMM_GAP, lambda: timm_route(TIMM_GAP, "upcycled_timm_vit", **timm_model_args(TIMM_GAP), num_experts=4)
        ),
    ),
    FidelityCase(
        "timm ViT (GAP, QK-norm, tanh GELU) -> Soft-MoE ViT family defaults, no MoE block, fp32",
        TIMM_GAP,
        lambda: compare_vit(
            TIMM_GAP,
            lambda: timm_route(
                TIMM_GAP, "soft_moe_vit_small_patch16_224_e128", **TINY_VIT, moe_layers="none", fc_norm=True
            ),
        ),
    ),
    *[
        FidelityCase(
            f"timm ViT -> {card} (card route; renormalised top-k, dropless), fp32",
            TIMM,
            partial(compare_vit, TIMM, partial(card_route, card, **DENSE_ROUTING)),
            cards=(card,),
        )
        for card in VMOE_CARDS
    ],
    *[
        FidelityCase(
            f"timm ViT -> {card} (card route, moe_layers=none), fp32",
            TIMM,
            partial(compare_vit, TIMM, partial(card_route, card, moe_layers="none")),
            cards=(card,),
        )
        for card in SOFT_CARDS
    ],
    *[
        FidelityCase(
            f"timm ViT -> {card} (card; blocks before Soft MoE, experts copied)",
            TIMM,
            partial(compare_soft_moe_card, card),
            cards=(card,),
        )
        for card in SOFT_CARDS
    ],
    FidelityCase(
        "open_clip CLIP -> upcycled_open_clip, checkpoint_format=open_clip, fp32", OPEN_CLIP, compare_open_clip
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_fidelity(case):
    case.check()


def test_fixtures_name_their_upstream_commit():
    for folder, upstream in (
        (TIMM, "huggingface/pytorch-image-models"),
        (TIMM_GAP, "huggingface/pytorch-image-models"),
        (OPEN_CLIP, "mlfoundations/open_clip"),
    ):
        meta = json.loads((fixture_dir(folder) / "meta.json").read_text())
        assert meta["upstream"] == upstream and len(meta["commit"]) == 40
        assert meta["generator"] == "tools/upstream_dense.py"
        assert (fixture_dir(folder) / "README.md").is_file()


def test_every_timm_format_card_is_covered():
    timm_cards = {name for name in mome.list_pretrained() if mome.get_pretrained_cfg(name).source_format == "timm"}
    covered = {card for case in CASES for card in case.cards}
    assert timm_cards and timm_cards <= covered, timm_cards - covered


def test_the_card_routing_of_vmoe_is_an_initialisation_not_the_dense_function():
    """With the V-MoE card's own routing (top-2 weights not renormalised) the output differs: stated, not hidden."""
    inputs, outputs, _ = fixture(TIMM)
    model = card_route(VMOE_CARDS[0], moe_kwargs=dict(capacity_factor=None, eval_capacity_factor=None)).eval()
    with torch.no_grad():
        assert max_abs_diff(model(inputs["image"]), outputs["logits"]) > 1e-3


def test_open_clip_fixture_initialises_a_limoe():
    """The open_clip format also initialises a one-tower LIMoE (strict key map; not the CLIP's function)."""
    model = mome.create_model(
        "limoe_tiny_patch8_e4",
        checkpoint_path=weights(OPEN_CLIP),
        checkpoint_format="open_clip",
        converter_options=dict(ignore_prefixes=list(OPEN_CLIP_NO_COUNTERPART)),
        img_size=16,
        patch_size=4,
        width=32,
        depth=2,
        num_heads=2,
        embed_dim=24,
        vocab_size=64,
        context_length=8,
    )
    dense = load_file(weights(OPEN_CLIP))
    assert torch.equal(model.blocks[0].attn.qkv.weight, dense["visual.transformer.resblocks.0.attn.in_proj_weight"])
    assert torch.equal(model.blocks[1].mlp.experts.w_in[3], dense["visual.transformer.resblocks.1.mlp.c_fc.weight"])


def corrupt(tmp_path, folder: str, how: str) -> str:
    state = load_file(weights(folder))
    key = "blocks.2.attn.qkv.weight"
    if how == "missing":
        del state[key]
    elif how == "extra":
        key = "head_dist.weight"
        state[key] = torch.zeros(10, 32)
    else:
        key = "blocks.1.mlp.fc1.weight"
        state[key] = state[key][:-1].clone()
    path = tmp_path / f"{how}.safetensors"
    save_file(state, path)
    return str(path), key


@pytest.mark.parametrize("how", ["missing", "extra", "misshaped"])
def test_a_corrupted_timm_checkpoint_names_the_key_and_loads_nothing(tmp_path, how):
    path, key = corrupt(tmp_path, TIMM, how)
    with pytest.raises(mome.CheckpointMismatchError, match=key.replace(".", r"\.")):
        mome.create_model(
            "vmoe_b16_e8.augreg_in21k_upcycled", pretrained=True, pretrained_cfg_overlay=dict(file=path), **TINY_VIT
        )
    model = mome.create_model("upcycled_timm_vit", **timm_model_args(TIMM), num_experts=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mome.CheckpointMismatchError, match=key.replace(".", r"\.")):
        mome.load_checkpoint_file(model, path, "timm")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded half-way
