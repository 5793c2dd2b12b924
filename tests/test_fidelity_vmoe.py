"""V-MoE and Soft MoE against outputs google-research/vmoe's own code produced.

The fixtures in ``tests/data/upstream/{vmoe_last2_prelogits,vmoe_last2_ft,vmoe_every2,soft_moe_gap}`` are
tiny ``vmoe.nn.vit_moe.VisionTransformerMoe`` models with every parameter re-drawn at random, saved by vmoe's
own sharded writer (``ckpt.index`` + ``ckpt.data-*``), and the outputs of vmoe's forward in eval mode
(``tools/upstream_vmoe.py``; each folder's README names the commit). Every case loads the checkpoint
through both public routes -- ``create_model(arch, checkpoint_path=..., checkpoint_format="vmoe", ...)`` and
the card, ``create_model("arch.tag", pretrained=True, pretrained_cfg_overlay=dict(file=...))`` with the
card's own model options (pre_logits, MoE blocks, token groups of 8 images, capacity factors, bf16 dispatch)
and only the tiny sizes overridden -- and compares logits, the encoder output, the head's input
(``pre_logits``) and each MoE layer's routing: the combine weight of every (token, expert) with the tokens
capacity dropped at 0 (V-MoE), the dispatch and combine weights over slots (Soft MoE), and the importance
loss per layer.

Diffs are relative to each output's scale, ``max |ours - theirs| / max |theirs|`` (the outputs are O(1):
|logits| < 4, |features| < 5, weights <= 1; fp32 rounding alone reaches 1e-5 absolute on the logits). fp32
dispatch is held to 1e-5; the bf16 dispatch
option (``dispatch_dtype="bfloat16"``) is compared with the upstream's bf16-dispatcher outputs and held to
1e-2, though it rounds at the same points as vmoe's ``Bfloat16Dispatcher`` and lands far closer.

What this does not cover: the official Soft MoE router always dispatches in bf16 (a hard-coded
``Bfloat16Dispatcher``), so no upstream fp32 Soft MoE output exists; fp32 Soft MoE is compared with those
bf16 outputs (tolerance 1e-2). Training-mode numerics (router noise, the load loss, dropout) are random
upstream and not compared; the tiny models stand in for the released widths (the converter is the same).
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

import mome
from mome.convert.vmoe import is_vmoe_checkpoint, read_vmoe_checkpoint
from mome.layers import MoE, SoftMoE
from mome.layers.dispatch import plan_dispatch
from tests.fidelity import FidelityCase, fixture_dir, fixture_meta, max_abs_diff

#: The tiny sizes of every fixture (tools/upstream_vmoe.py); cards and checkpoint routes override these only.
TINY = dict(img_size=16, patch_size=4, embed_dim=16, num_heads=2, mlp_ratio=2.0, num_classes=10, num_experts=4)
FP32, BF16 = 1e-5, 1e-2


@functools.cache
def _upstream(folder: str) -> dict[str, torch.Tensor]:
    with np.load(fixture_dir(folder) / "outputs.npz", allow_pickle=False) as arrays:
        return {key: torch.from_numpy(arrays[key].copy()) for key in arrays.files}


def _images(folder: str) -> torch.Tensor:
    return _upstream(folder)["images"].permute(0, 3, 1, 2).contiguous()  # NHWC (Flax) -> NCHW


def _checkpoint(folder: str) -> Path:
    return fixture_dir(folder) / "ckpt.index"


@torch.no_grad()
def run_model(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """mome's outputs under the fixture's names: logits, features, pre_logits and the routing of each MoE block."""
    captured: dict[int, object] = {}
    hooks = []
    for index, block in enumerate(model.blocks):
        if isinstance(block.mlp, MoE):
            hooks.append(
                block.mlp.router.register_forward_hook(lambda m, a, out, i=index: captured.__setitem__(i, out))
            )
        elif isinstance(block.mlp, SoftMoE):
            hooks.append(block.mlp.register_forward_pre_hook(lambda m, a, i=index: captured.__setitem__(i, a[0])))
    try:
        features = model.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    pre_logits = model.forward_head(features, pre_logits=True)
    outputs = {"features": features, "pre_logits": pre_logits, "logits": model.head(pre_logits)}
    for index, record in captured.items():
        layer = model.blocks[index].mlp
        if isinstance(layer, SoftMoE):
            dispatch, combine = layer.routing_weights(record)  # [B, M, E*P] each
            outputs[f"combine_weights.{index}"], outputs[f"dispatch_weights.{index}"] = combine, dispatch
            continue
        num_tokens = record.expert_index.shape[0]
        groups = num_tokens // layer.group_size if layer.group_size else 1
        routed, _ = plan_dispatch(record, layer.capacity(num_tokens // groups), groups)
        per_expert = torch.zeros(num_tokens, layer.num_experts).scatter_add_(
            1, routed.expert_index, routed.combine_weights
        )  # [T, E], 0 where capacity dropped the assignment
        outputs[f"combine_weights.{index}"] = per_expert
        if "loss/importance" in layer.last_routing_stats:
            outputs[f"importance_loss.{index}"] = layer.last_routing_stats["loss/importance"]
    return outputs


def compare(model: torch.nn.Module, folder: str, output_set: str) -> dict[str, float]:
    """``{output: max |ours - theirs| / max |theirs|}`` for every output the upstream wrote in ``<output_set>/``."""
    upstream = _upstream(folder)
    ours = run_model(model.eval(), _images(folder))
    diffs = {}
    for key, theirs in upstream.items():
        if not key.startswith(f"{output_set}/"):
            continue
        name = key.split("/", 1)[1]
        if name not in ours:
            raise AssertionError(f"{folder}/{key}: mome produced no {name!r}")
        mine = ours[name]
        if name.startswith("importance_loss."):
            theirs = theirs.mean()  # upstream: one value per routing group; mome averages over groups
        mine = mine.reshape(theirs.shape) if mine.numel() == theirs.numel() else mine
        diffs[name] = max_abs_diff(mine, theirs, relative=True)
    return diffs


# ------------------------------------------------------------------------------------------- cases
#: (folder, output set, eval capacity factor, label): each checked through checkpoint_path.
VMOE_RUNS = [
    # V-MoE S/32 pre-training layout: pre_logits, last 2 odd blocks, eval capacity factor 4 (nothing dropped)
    ("vmoe_last2_prelogits", "cf4", 4.0, "S/32 pre_logits"),
    # the same checkpoint at capacity factor 1.05: 17-27% of the routed assignments dropped
    ("vmoe_last2_prelogits", "cf1.05", 1.05, "S/32 pre_logits, tokens dropped"),
    ("vmoe_last2_ft", "cf1.5", 1.5, "S/32 fine-tuned"),
    ("vmoe_every2", "cf1.05", 1.05, "B/16, tokens dropped"),
    ("vmoe_every2", "cf1.5", 1.5, "B/16 fine-tuned"),
]
#: card -> (folder, output set): the fixture made with the card's upstream config (meta.json's covers_cards).
CARDS = {
    "vmoe_s32_e8.in1k_randaug_light1": ("vmoe_last2_prelogits", "cf4"),
    "vmoe_s32_e8.in1k_randaug_medium": ("vmoe_last2_prelogits", "cf4"),
    "vmoe_s32_e8.in1k_randaug_light1_ft_in1k_384": ("vmoe_last2_ft", "cf1.5"),
    "vmoe_b16_e8.in21k_randaug_strong": ("vmoe_every2", "cf1.05"),
    "vmoe_b16_e8.in21k_randaug_strong_ft_in1k_384": ("vmoe_every2", "cf1.5"),
}
_LAYOUT = {
    "vmoe_last2_prelogits": dict(arch="vmoe_s32_e8", depth=6, moe_layers="last_2", representation_size=16),
    "vmoe_last2_ft": dict(arch="vmoe_s32_e8", depth=6, moe_layers="last_2"),
    "vmoe_every2": dict(arch="vmoe_b16_e8", depth=4, moe_layers="every_2"),
}
PRECISIONS = (("fp32", "float32", FP32), ("bf16", "bfloat16", BF16))


def _vmoe_by_path(folder: str, capacity: float, dispatch_dtype: str) -> torch.nn.Module:
    """The checkpoint route: every upstream option given explicitly."""
    layout = dict(_LAYOUT[folder])
    arch = layout.pop("arch")
    return mome.create_model(
        arch,
        checkpoint_path=_checkpoint(folder),
        checkpoint_format="vmoe",
        **TINY,
        **layout,
        group_size_images=8,
        dispatch_dtype=dispatch_dtype,
        moe_kwargs={"capacity_factor": 1.05, "eval_capacity_factor": capacity},
    )


def _vmoe_by_card(card: str, dispatch_dtype: str) -> torch.nn.Module:
    """The card route: the card's options; only the tiny sizes and the dispatch dtype under test given."""
    folder = CARDS[card][0]
    sizes = {k: v for k, v in _LAYOUT[folder].items() if k in ("depth", "representation_size")}
    return mome.create_model(
        card,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(_checkpoint(folder))),
        **TINY,
        **sizes,
        dispatch_dtype=dispatch_dtype,
    )


def _soft_model(**kwargs) -> torch.nn.Module:
    return mome.create_model(
        "soft_moe_vit_tiny_patch8_e8",
        checkpoint_path=_checkpoint("soft_moe_gap"),
        **{**TINY, "depth": 4, "slots_per_expert": 2, **kwargs},
    )


def _cases() -> list[FidelityCase]:
    cases = []
    for precision, dtype, tolerance in PRECISIONS:
        for folder, output_set, capacity, label in VMOE_RUNS:
            build = functools.partial(_vmoe_by_path, folder, capacity, dtype)
            cases.append(
                FidelityCase(
                    f"V-MoE {label}, capacity {capacity}, {precision} dispatch (checkpoint_path)",
                    folder,
                    lambda f=folder, s=f"{output_set}.{precision}", m=build: compare(m(), f, s),
                    tolerance,
                    relative=True,
                    cards=tuple(card for card, where in CARDS.items() if where == (folder, output_set)),
                )
            )
        for card, (folder, output_set) in CARDS.items():
            build = functools.partial(_vmoe_by_card, card, dtype)
            cases.append(
                FidelityCase(
                    f"{card}, {precision} dispatch (card)",
                    folder,
                    lambda f=folder, s=f"{output_set}.{precision}", m=build: compare(m(), f, s),
                    tolerance,
                    relative=True,
                    cards=(card,),
                )
            )
    cases.append(
        FidelityCase(
            "Soft MoE ViT (norm, then GAP), bf16 dispatch (checkpoint_path)",
            "soft_moe_gap",
            lambda: compare(_soft_model(dispatch_dtype="bfloat16"), "soft_moe_gap", "bf16"),
            BF16,
            relative=True,
        )
    )
    cases.append(
        FidelityCase(
            "Soft MoE ViT (norm, then GAP), fp32 dispatch vs upstream's bf16 (checkpoint_path)",
            "soft_moe_gap",
            lambda: compare(_soft_model(), "soft_moe_gap", "bf16"),
            BF16,
            relative=True,
        )
    )
    return cases


CASES: list[FidelityCase] = _cases()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_fidelity(case: FidelityCase) -> None:
    diffs = case.check()
    assert any(k.startswith("combine_weights.") for k in diffs) and "logits" in diffs


def test_fixtures_are_vmoe_own_and_cover_the_cards() -> None:
    covered = set()
    for folder in ("vmoe_last2_prelogits", "vmoe_last2_ft", "vmoe_every2", "soft_moe_gap"):
        meta = fixture_meta(folder)
        assert meta["upstream"] == "google-research/vmoe" and len(meta["commit"]) == 40
        assert meta["generator"] == "tools/upstream_vmoe.py"
        covered |= set(meta["covers_cards"])
        assert is_vmoe_checkpoint(_checkpoint(folder))
    assert (
        covered
        == set(CARDS)
        == {p.stem for p in Path(mome.__file__).parent.parent.glob("zoo/vmoe_*.yaml")}
        - {
            "vmoe_b16_e8.augreg_in21k_upcycled",
            "vmoe_l16_e8.augreg_in21k_upcycled",
        }
    )
    # the drops the capacity cases are about really happen upstream
    kept = fixture_meta("vmoe_last2_prelogits")["routing"]["cf1.05.fp32"]["kept_assignment_fraction"]
    assert max(kept.values()) < 0.9


def test_the_bf16_option_is_what_makes_the_bf16_outputs() -> None:
    """fp32 dispatch misses the upstream bf16 outputs by far more than the bf16 option does."""
    args = ("vmoe_last2_prelogits", 1.05)
    fp32 = compare(_vmoe_by_path(*args, "float32"), "vmoe_last2_prelogits", "cf1.05.bf16")["logits"]
    bf16 = compare(_vmoe_by_path(*args, "bfloat16"), "vmoe_last2_prelogits", "cf1.05.bf16")["logits"]
    assert bf16 < FP32 < 10 * FP32 < fp32


# ------------------------------------------------------------------------------------------- bad input
def _copy_fixture(folder: str, tmp_path: Path) -> Path:
    target = tmp_path / folder
    shutil.copytree(fixture_dir(folder), target)
    return target / "ckpt.index"


def _write_msgpack(path: Path, tree: Mapping[str, torch.Tensor]) -> None:
    """A one-file Flax-style msgpack tree (ext 1 ndarrays), like ``flax.serialization.to_bytes``."""
    import msgpack

    def encode(value):
        if isinstance(value, torch.Tensor):
            array = value.numpy()
            return msgpack.ExtType(1, msgpack.packb((array.shape, array.dtype.name, array.tobytes())))
        return value

    nested: dict = {}
    for key, value in tree.items():
        node = nested
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.write_bytes(msgpack.packb(nested, default=encode))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("missing", r"lacks: params/Encoder/encoderblock_5/Moe/Mlp/Dense_0/kernel"),
        ("extra", r"no counterpart in the model: params/Encoder/encoderblock_5/Moe/Router/extra"),
        ("shape", r"blocks\.5\.mlp\.experts\.w_in <- params/Encoder/encoderblock_5/Moe/Mlp/Dense_0/kernel"),
    ],
)
def test_corrupted_checkpoint_names_the_key_and_loads_nothing(tmp_path, edit, expected) -> None:
    state = read_vmoe_checkpoint(_checkpoint("vmoe_last2_prelogits"))
    key = "params/Encoder/encoderblock_5/Moe/Mlp/Dense_0/kernel"
    if edit == "missing":
        del state[key]
    elif edit == "extra":
        state["params/Encoder/encoderblock_5/Moe/Router/extra"] = torch.zeros(3)
    else:
        state[key] = state[key][:, :, :-1]
    bad = tmp_path / "bad.msgpack"
    _write_msgpack(bad, state)
    model = mome.create_model("vmoe_s32_e8", **TINY, depth=6, moe_layers="last_2", representation_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mome.CheckpointMismatchError, match=expected):
        mome.load_checkpoint_file(model, bad, "vmoe")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded half-way


def test_a_missing_shard_is_a_typed_error(tmp_path) -> None:
    index = _copy_fixture("vmoe_every2", tmp_path)
    next(index.parent.glob("ckpt.data-00001-*")).unlink()
    with pytest.raises(mome.CorruptCheckpointError, match=r"ckpt\.data-00001-of-00002, which is missing"):
        read_vmoe_checkpoint(index)


def test_wrong_files_get_typed_errors_not_torch_advice(tmp_path) -> None:
    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickle)
    with pytest.raises(mome.CheckpointFormatError, match="is not a vmoe checkpoint: it is a torch checkpoint") as err:
        read_vmoe_checkpoint(pickle)
    assert "weights_only" not in str(err.value)
    truncated = tmp_path / "ckpt.index"
    truncated.write_bytes(_checkpoint("vmoe_every2").read_bytes()[:100])
    with pytest.raises(mome.CorruptCheckpointError, match="cannot be decoded"):
        read_vmoe_checkpoint(truncated)
    assert not is_vmoe_checkpoint(pickle) and not is_vmoe_checkpoint(tmp_path) and not is_vmoe_checkpoint(truncated)
    shard = next(fixture_dir("vmoe_every2").glob("ckpt.data-00000-*"))
    assert is_vmoe_checkpoint(shard) and is_vmoe_checkpoint(fixture_dir("vmoe_every2") / "ckpt")


def test_soft_moe_layout_mismatch_is_refused() -> None:
    with pytest.raises(mome.CheckpointMismatchError, match="fc_norm=False"):
        _soft_model(fc_norm=True)


def test_pre_logits_checkpoint_into_a_model_without_it_names_representation_size() -> None:
    with pytest.raises(mome.CheckpointMismatchError, match="representation_size=16"):
        mome.create_model(
            "vmoe_s32_e8", checkpoint_path=_checkpoint("vmoe_last2_prelogits"), **TINY, depth=6, moe_layers="last_2"
        )


@pytest.mark.parametrize("moe_type", ["sparse", "soft"])
def test_dispatch_dtype_rounds_only_what_crosses_the_dispatch(moe_type) -> None:
    """None and "float32" change nothing in an fp32 model; bf16 gives the same result on both dispatch paths."""
    torch.manual_seed(0)
    kwargs = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=5, moe_layers=[1])
    if moe_type == "sparse":
        kwargs["moe_kwargs"] = {"capacity_factor": 1.0}
    reference = mome.create_model("vmoe_tiny_patch8_e4", moe_type=moe_type, **kwargs).eval()
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        plain = reference(images)
        for dtype, expect_equal in (("float32", True), ("bfloat16", False)):
            model = mome.create_model("vmoe_tiny_patch8_e4", moe_type=moe_type, dispatch_dtype=dtype, **kwargs).eval()
            model.load_state_dict(reference.state_dict())
            out = model(images)
            assert torch.equal(out, plain) == expect_equal
            assert (out - plain).abs().max() < 0.05
            if moe_type == "sparse":
                model.blocks[1].mlp.dispatch = "buffers"
                torch.testing.assert_close(model(images), out, rtol=0, atol=1e-6)
