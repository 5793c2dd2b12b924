"""VLMo against outputs microsoft/unilm's own ``vlmo/`` code produced.

The fixtures in ``tests/data/upstream/vlmo_{relpos,abspos}_*`` are tiny upstream ``vlmo.modules.vlmo_module.VLMo``
LightningModules (``relpos``: base/large's shared relative position bias and layer scale; ``abspos``:
base_plus's absolute positions without layer scale), one per kind of released checkpoint and with exactly
the heads upstream builds for it, every parameter re-drawn at random, saved by upstream's own writers (raw
``torch.save`` of the state dict for stage 2 and pre-training, Lightning's ``Trainer.save_checkpoint`` for the
fine-tuned ones) together with the outputs of upstream's ``infer*`` methods and ``compute_*`` objectives
(``tools/upstream_vlmo.py``; each folder's README names the commit, the function behind every output and
the shims, none of which changes a number).

Every fixture is loaded through both public routes -- ``create_model(arch, checkpoint_path=...,
checkpoint_format="unilm_vlmo", ...)`` and every card it stands for, ``create_model("arch.tag",
pretrained=True, pretrained_cfg_overlay=dict(file=...))`` with the card's own options (heads, the text-only
stage-2 layout, image size) and only the tiny sizes overridden -- and compared output by output: image-only,
text-only and fusion tokens, the ITC embeddings of both paths (plain and VL-FFN) and their logits and scales,
ITM, MLM (fusion and text-only), VQA and NLVR2 logits. Absolute diffs (every output is O(1): |x| < 4, the
logit scales < 17), fp32, held to 1e-5.

``vlmo_*_resize`` holds what upstream's ``load_pretrained_weight`` makes of the 16 px pre-training checkpoint
in a 24 px model (the relative table's geometric-progression ``interp2d`` resize, base_plus's bicubic
``pos_embed``); mome's converter must do the same when a model's image size differs from the file's.

What this does not cover: the stage-2 fixture has no image outputs (upstream's text pre-training module has
no ITC projection, so its ``infer_image`` cannot run); ITM's hard-negative sampling (random upstream) -- the
ITM head is compared on the positive pairs; losses and training-mode numerics (dropout, drop path). The tiny
models stand in for the released widths (the converter and the code paths are the same); text is always
``max_text_len`` long, as upstream's fusion blocks split text from image tokens at that length.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mome
from tests.fidelity import FidelityCase, fixture_dir, fixture_meta, max_abs_diff

FP32 = 1e-5
STAGES = ("stage2", "vl4m", "irtr", "nlvr2", "vqa")
STYLES = {"relpos": "vlmo_base_patch16_224", "abspos": "vlmo_base_plus_patch16_224"}
#: The sizes of the tiny upstream models (tools/upstream_vlmo.py); cards and checkpoint routes override only these.
TINY = dict(patch_size=4, embed_dim=16, num_heads=2, mlp_ratio=2.0, depth=3, vocab_size=40, max_text_len=8)
TINY_STYLE = {"relpos": dict(rel_pos_text_len=12), "abspos": {}}
#: What the checkpoint route passes beyond the tiny sizes: the options each card carries (heads, stage 2).
HEADS = {
    "stage2": dict(heads=["mlm"]),
    "vl4m": {},
    "irtr": dict(heads=["itc"]),
    "nlvr2": dict(heads=["nlvr2"]),
    "vqa": dict(heads=["vqa"]),
    "resize": {},
}


@functools.cache
def _tensors(folder: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(fixture_dir(folder) / f"{name}.safetensors"))


def _checkpoint(folder: str) -> Path:
    return (fixture_dir(folder) / fixture_meta(folder)["checkpoint"]).resolve()


def _tiny(folder: str, *, text_len: int | None = None) -> dict:
    """Size kwargs of a fixture: the tiny widths, its image size, its VL-FFN start (stage 2: none), text length."""
    meta = fixture_meta(folder)
    kwargs = dict(TINY, **TINY_STYLE[meta["style"]], img_size=meta["config"]["image_size"])
    kwargs["vlffn_start_layer_index"] = TINY["depth"] if meta["stage"] == "stage2" else meta["vl_from"]
    kwargs["max_text_len"] = text_len or meta["config"]["max_text_len"]
    if meta["stage"] == "vqa":
        kwargs["vqa_num_classes"] = meta["config"]["vqav2_label_size"]
    return kwargs


def _by_path(folder: str, text_len: int | None = None) -> torch.nn.Module:
    """The checkpoint route: the architecture, the fixture's options given explicitly."""
    meta = fixture_meta(folder)
    return mome.create_model(
        STYLES[meta["style"]],
        checkpoint_path=_checkpoint(folder),
        checkpoint_format="unilm_vlmo",
        **_tiny(folder, text_len=text_len),
        **HEADS[meta["stage"]],
    )


def _by_card(card: str, folder: str, text_len: int | None = None) -> torch.nn.Module:
    """The card route: the card's options (heads, image size); only the tiny sizes given."""
    return mome.create_model(
        card,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(_checkpoint(folder))),
        **_tiny(folder, text_len=text_len),
    )


@torch.no_grad()
def run_model(model: torch.nn.Module, folder: str, text_len: int) -> dict[str, torch.Tensor]:
    """mome's outputs under the fixture's names, for the fixture's inputs cut to ``text_len`` tokens."""
    model.eval()
    inputs = _tensors(folder, "inputs")
    image, ids, mask = inputs["image"], inputs["text_ids"][:, :text_len], inputs["text_masks"][:, :text_len]
    mlm_ids = inputs["text_ids_mlm"][:, :text_len]
    out: dict[str, torch.Tensor] = {}
    if model.mlm_score is not None:
        with_image = None if model.vlffn_start_layer_index == model.depth else image
        out["mlm_logits"] = model.mlm_logits(mlm_ids, image=with_image, text_mask=mask)
    if model.vlffn_start_layer_index == model.depth:  # stage 2: text pre-training
        out["text_feats"] = model.forward_text(ids, mask)
        return out
    if model.itc_image_proj is not None:
        out["image_feats"] = model.forward_image(image)
        out["text_feats"] = model.forward_text(ids, mask)
        image_embeds, text_embeds, scale = model(image, ids, text_mask=mask)
        out.update(image_embeds=image_embeds, text_embeds=text_embeds)
        prefix = "itc" if model.itc_vl_image_proj is not None else "irtr"
        out[f"{prefix}_i2t_logits"] = scale * image_embeds @ text_embeds.T
        out[f"{prefix}_t2i_logits"] = scale * text_embeds @ image_embeds.T
        out[f"{prefix}_logit_scale"] = scale
    if model.itc_vl_image_proj is not None:
        out["image_vl_embeds"] = model.encode_image(image, normalize=True, vlffn=True)
        out["text_vl_embeds"] = model.encode_text(ids, normalize=True, text_mask=mask, vlffn=True)
        out["itc_logit_vl_scale"] = model.logit_vl_scale.exp()
    tokens, pooled = model.forward_fusion(image, ids, mask)
    out.update(fusion_text_feats=tokens[:, :text_len], fusion_image_feats=tokens[:, text_len:], fusion_cls_feats=pooled)
    if model.itm_score is not None:
        out["itm_logits"] = model.itm_logits(image, ids, mask)
    if model.vqa_classifier is not None:
        out["vqa_logits"] = model.vqa_logits(image, ids, mask)
    if model.nlvr2_classifier is not None:
        out["nlvr2_logits"] = model.nlvr2_logits(image, inputs["image_1"], ids, mask)
        tokens, pooled = model.forward_fusion(inputs["image_1"], ids, mask, image_token_type=2)
        out.update(fusion_1_text_feats=tokens[:, :text_len], fusion_1_image_feats=tokens[:, text_len:])
        out["fusion_1_cls_feats"] = pooled
    return out


def compare(model: torch.nn.Module, folder: str, text_len: int | None = None) -> dict[str, float]:
    """``{output: max |ours - theirs|}`` for every output upstream wrote, on the first ``text_len`` tokens
    (all of them by default; fewer for the stage-2 checkpoint loaded at the cards' text length, whose
    inputs are padding from there on, so the upstream outputs on those tokens are the cropped model's)."""
    upstream = _tensors(folder, "outputs")
    full = _tensors(folder, "inputs")["text_ids"].shape[1]
    text_len = text_len or full
    ours = run_model(model, folder, text_len)
    missing = sorted(set(upstream) - set(ours))
    if missing:
        raise AssertionError(f"{folder}: mome produced no {missing}")
    diffs = {}
    for name, theirs in upstream.items():
        if theirs.ndim == 3 and theirs.shape[1] == full and name.split("_")[0] in ("text", "mlm", "fusion"):
            theirs = theirs[:, :text_len]  # text tokens [B, L, ...]
        diffs[name] = max_abs_diff(ours[name], theirs)
    return diffs


def _cases() -> list[FidelityCase]:
    cases = []
    for style, arch in STYLES.items():
        for stage in (*STAGES, "resize"):
            folder = f"vlmo_{style}_{stage}"
            cards = tuple(fixture_meta(folder)["covers_cards"])
            label = f"VLMo {style} {stage}"
            cases.append(
                FidelityCase(
                    f"{label} ({arch}, checkpoint_path)",
                    folder,
                    lambda f=folder: compare(_by_path(f), f),
                    FP32,
                    cards=cards,
                )
            )
            for card in cards:
                text_len = TINY["max_text_len"] if stage == "stage2" else None  # the cards' 40 of 196
                cases.append(
                    FidelityCase(
                        f"{card} ({label}, card)",
                        folder,
                        lambda c=card, f=folder, n=text_len: compare(_by_card(c, f, n), f, n),
                        FP32,
                        cards=(card,),
                    )
                )
    return cases


CASES: list[FidelityCase] = _cases()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_fidelity(case: FidelityCase) -> None:
    case.check()


def test_fixtures_are_unilm_own_and_cover_every_vlmo_card() -> None:
    covered = set()
    for style in STYLES:
        for stage in (*STAGES, "resize"):
            meta = fixture_meta(f"vlmo_{style}_{stage}")
            assert meta["upstream"] == "microsoft/unilm" and len(meta["commit"]) == 40
            assert meta["generator"] == "tools/upstream_vlmo.py"
            covered |= set(meta["covers_cards"])
    cards = {p.stem for p in Path(mome.__file__).parent.parent.glob("zoo/vlmo_*.yaml")}
    assert len(cards) == 18 and covered == cards == {c for case in CASES for c in case.cards}
    # the writers are upstream's: a raw state dict (with the index tensors the released files carry) and
    # Lightning's checkpoint
    raw = torch.load(_checkpoint("vlmo_relpos_vl4m"), weights_only=True)
    assert "text_relative_position_index" in raw and "transformer.blocks.2.mlp_vl.fc1.weight" in raw
    lightning = torch.load(_checkpoint("vlmo_relpos_vqa"), weights_only=True)
    assert {"state_dict", "pytorch-lightning_version", "hyper_parameters"} <= set(lightning)
    assert "vqa_classifier.3.weight" in lightning["state_dict"]


# ------------------------------------------------------------------------------------------- bad input
def _corrupt(tmp_path: Path, folder: str, edit) -> Path:
    """A copy of the fixture's checkpoint with ``edit(state_dict)`` applied."""
    raw = torch.load(_checkpoint(folder), weights_only=True)
    state = raw["state_dict"] if "state_dict" in raw else raw
    edit(state)
    path = tmp_path / "corrupt.pt"
    torch.save(raw, path)
    return path


@pytest.mark.parametrize(
    ("folder", "edit", "named"),
    [
        (
            "vlmo_relpos_vl4m",
            lambda s: s.pop("transformer.blocks.1.mlp_imag.fc2.bias"),
            [
                "transformer.blocks.1.mlp_imag.fc2.bias",
                "blocks.1.mlp.moe.experts.b_out",
                "transformer.blocks.1.mlp_imag: block 1, V-FFN (image expert)",
            ],
        ),
        (
            "vlmo_relpos_vqa",
            lambda s: s.__setitem__("vqa_classifier.3.weight", torch.zeros(9, 32)),
            [
                "vqa_classifier.3.weight <- vqa_classifier.3.weight: (9, 32) vs model (7, 32)",
                "vqa_classifier: the VQA head",
            ],
        ),
        (
            "vlmo_abspos_irtr",
            lambda s: s.__setitem__("itm_score.fc.weight", torch.zeros(2, 16)),
            ["itm_score.fc.weight", "no counterpart", "itm_score: the ITM head"],
        ),
        (
            "vlmo_abspos_nlvr2",
            lambda s: s.__setitem__("token_type_embeddings.weight", s["token_type_embeddings.weight"][:2]),
            [
                "token_type_embeddings.weight <- token_type_embeddings.weight: (2, 16) vs model (3, 16)",
                "token_type_embeddings: the modality type embeddings",
            ],
        ),
    ],
    ids=["missing expert key", "mis-shaped VQA head", "extra ITM head", "two token types for NLVR2"],
)
def test_corrupted_checkpoint_names_the_key_and_loads_nothing(tmp_path, folder, edit, named) -> None:
    meta = fixture_meta(folder)
    path = _corrupt(tmp_path, folder, edit)
    model = mome.create_model(STYLES[meta["style"]], **_tiny(folder), **HEADS[meta["stage"]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mome.CheckpointMismatchError) as info:
        mome.load_checkpoint_file(model, path, checkpoint_format="unilm_vlmo")
    message = str(info.value)
    assert all(text in message for text in named), message  # the upstream key, the model key, the upstream layer
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded half-way
    with pytest.raises(mome.CheckpointMismatchError, match="mlp_imag|vqa_classifier|itm_score|token_type"):
        mome.create_model(
            STYLES[meta["style"]], checkpoint_path=path, checkpoint_format="unilm_vlmo", **_tiny(folder),
            **HEADS[meta["stage"]],
        )  # fmt: skip


def test_card_route_refuses_a_checkpoint_of_other_heads(tmp_path) -> None:
    """A VQA card given the pre-training file: upstream's heads differ, and the error names them."""
    path = tmp_path / "vl4m.pt"
    shutil.copy(_checkpoint("vlmo_relpos_vl4m"), path)
    with pytest.raises(mome.CheckpointMismatchError, match=r"itc_image_proj\.fc\.weight") as info:
        mome.create_model(
            "vlmo_base_patch16_224.vl4m_ft_vqav2_480",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(path)),
            **_tiny("vlmo_relpos_vqa"),
        )
    assert "vqa_classifier" in str(info.value)
