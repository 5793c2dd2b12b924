"""Patch routing maps of the evaluation report (V-MoE's and LIMoE's per-image figures): with a hash router, whose
expert is a fixed function of the token's position in the MoE call, the recorded ``[H_p, W_p]`` grid of every
family equals the hand-computed one: CLS tokens (ViT, VLMo) and text tokens (VLMo fusion, MoE-LLaVA prompts) left
out, tokens over capacity marked ``-1``; Soft MoE grids are the argmax of the experts' combine shares; and a
``mome-eval`` run writes ``routing_patch_map.png`` and ``routing_patches.json`` (``routing_maps=0``: neither)."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval_cli import FAST, PNG, _fails_early, compose_eval

import mome
from mome.cli.eval import evaluate
from mome.layers import HashRouter
from mome.lit.eval_tasks import patch_grid
from mome.lit.routing_report import RoutingRecorder, write_routing_report

NO_AUX = {"aux_loss_weights": {}}  # a hash router has no gate to train


def _capture(model, images, *forward_args, method=None, indices=None):
    recorder = RoutingRecorder().attach(model)
    with torch.no_grad(), recorder.capture_patches(images, patch_grid(model, images), indices):
        (method or model)(*forward_args) if forward_args else (method or model)(images)
    recorder.detach()
    return recorder


def _expected_with_capacity(table: torch.Tensor, num_images: int, per_image: int, capacity: int | None) -> torch.Tensor:
    """``[B * N]`` expert of each token of a ``[B, N]`` call routed by position (``table[n]``), ``-1`` where the
    expert had already taken ``capacity`` earlier tokens (token order, no priority)."""
    experts = table[torch.arange(per_image)].repeat(num_images)  # [B * N]
    if capacity is None:
        return experts
    taken: dict[int, int] = {}
    out = experts.clone()
    for t, e in enumerate(experts.tolist()):
        taken[e] = taken.get(e, 0) + 1
        if taken[e] > capacity:
            out[t] = -1
    return out


def test_vmoe_grid_skips_the_cls_token_and_marks_dropped_patches():
    model = mome.create_model(
        "vmoe_tiny_patch8_e4", router="hash", top_k=1, moe_kwargs={**NO_AUX, "capacity_factor": 0.75}
    ).eval()
    images = torch.randn(3, 3, 32, 32)
    recorder = _capture(model, images, indices=[7, 8, 9])
    assert [m.index for m in recorder.patch_maps] == [7, 8, 9]
    height, width = model.patch_embed.grid_size  # 4 x 4 patches, after 1 CLS token
    per_image = 1 + height * width
    dropped = 0
    for index in model.moe_layer_indices:
        name = f"blocks.{index}.mlp"
        layer = model.blocks[index].mlp
        capacity = layer.capacity(3 * per_image)
        expected = _expected_with_capacity(layer.router.table, 3, per_image, capacity).view(3, per_image)
        for b, patch_map in enumerate(recorder.patch_maps):
            assert patch_map.prefix_tokens[name] == 1
            assert torch.equal(patch_map.layers[name], expected[b, 1:].view(height, width))  # CLS left out
        dropped += int((expected[:, 1:] < 0).sum())
    assert dropped > 0  # capacity 0.75 drops patches, shown as -1
    # without a capacity limit, the grid is the hash table at positions 1 .. H*W (not 0 .. H*W - 1)
    for index in model.moe_layer_indices:
        model.blocks[index].mlp.eval_capacity_factor = None
    recorder = _capture(model, images)
    table = model.blocks[1].mlp.router.table
    assert torch.equal(recorder.patch_maps[2].layers["blocks.1.mlp"], table[1 : 1 + height * width].view(4, 4))


def test_limoe_grid_reads_the_image_stream_of_the_joint_call():
    """LIMoE routes all image and text tokens of a block in one [1, T] call (images first, no CLS)."""
    model = mome.create_model("limoe_tiny_patch8_e4", router="hash", top_k=1, moe_kwargs=NO_AUX).eval()
    images, text = torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 5))
    recorder = _capture(model, images, images, text)  # forward(image, text): both streams in every MoE call
    patches = 16
    for index in model.moe_layer_indices:
        table = model.blocks[index].mlp.router.table
        for b, patch_map in enumerate(recorder.patch_maps):
            expected = table[b * patches + torch.arange(patches)].view(4, 4)  # position in the joint sequence
            assert torch.equal(patch_map.layers[f"blocks.{index}.mlp"], expected)
            assert patch_map.prefix_tokens[f"blocks.{index}.mlp"] == 0


@pytest.mark.parametrize("path", ["image", "fusion"])
def test_vlmo_grid_leaves_out_cls_and_text(path):
    model = mome.create_model("vlmo_tiny_patch8_32").eval()
    for block in model.blocks:
        block.mlp.moe.router = HashRouter(block.mlp.moe.num_experts)  # position -> expert, not modality -> expert
    images, text = torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 6))
    height, width = model.patch_embed.grid_size
    if path == "image":
        recorder = _capture(model, images, images, method=model.forward_image)
        offset = 1  # [CLS, patches]
    else:
        recorder = _capture(model, images, images, text, method=model.forward_fusion)
        offset = text.shape[1] + 1  # [text; CLS, patches]
    names = [f"blocks.{i}.mlp.moe" for i in range(model.vlffn_start_layer_index)]  # the VL-FFN blocks route nothing
    for name in names:
        table = dict(model.named_modules())[name].router.table
        expected = table[offset + torch.arange(height * width)].view(height, width)
        for patch_map in recorder.patch_maps:
            assert torch.equal(patch_map.layers[name], expected)
            assert patch_map.prefix_tokens[name] == 1


def test_vlmo_modality_experts_give_every_patch_the_image_expert():
    model = mome.create_model("vlmo_tiny_patch8_32").eval()
    images = torch.randn(2, 3, 32, 32)
    recorder = _capture(model, images, method=model.encode_image)
    grids = [g for m in recorder.patch_maps for g in m.layers.values()]
    assert grids and all(torch.equal(g, torch.zeros(4, 4, dtype=torch.long)) for g in grids)  # V-FFN = expert 0


def test_soft_moe_grid_is_the_expert_with_the_largest_combine_share():
    model = mome.create_model("soft_moe_vit_tiny_patch8_e8").eval()
    inputs = {}
    hooks = [
        model.blocks[i].mlp.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
        for i in model.moe_layer_indices
    ]
    images = torch.randn(2, 3, 32, 32)
    recorder = _capture(model, images)
    for hook in hooks:
        hook.remove()
    prefix = model.num_prefix_tokens
    for i in model.moe_layer_indices:
        layer = model.blocks[i].mlp
        combine = layer.routing_weights(inputs[i])[1]  # [B, M, E * P]
        share = combine.view(2, -1, layer.num_experts, layer.slots_per_expert).sum(-1)  # [B, M, E]
        for b, patch_map in enumerate(recorder.patch_maps):
            assert torch.equal(patch_map.layers[f"blocks.{i}.mlp"], share[b, prefix:].argmax(-1).view(4, 4))


def test_moe_llava_grid_reads_the_image_placeholders_of_the_prompt():
    """MoE-LLaVA: the patches are the prompt's image placeholder positions, in the pass that routes the whole
    prompt (the decoding steps are left out)."""
    from mome.lit.eval_vqa import VQAEvalTask
    from mome.lit.llava import generate_answer

    model = mome.create_model("moe_llava_tiny_e4").eval()
    for index in model.moe_layers:
        layer = model.language_model.layers[index].mlp
        layer.router = HashRouter(layer.num_experts)
    token_id = model.config.image_token_id
    patches = model.num_image_tokens  # 16 = 4 x 4
    prompt = torch.tensor([[1, 5, 6, *[token_id] * patches, 7, 8, 9]])  # [1, L]: 3 text ids before the image
    images = torch.randn(1, 3, 32, 32)
    task = VQAEvalTask(model)
    task._recorder = RoutingRecorder().attach(model)
    task._batch_indices = torch.tensor([4])
    with torch.no_grad(), task._llava_patch_capture(prompt, images):
        generate_answer(model, task.tokenizer.tokenizer, prompt, images, max_new_tokens=3)
    (patch_map,) = task._recorder.patch_maps
    assert patch_map.index == 4 and len(patch_map.layers) == len(model.moe_layers)
    for index in model.moe_layers:
        table = model.language_model.layers[index].mlp.router.table
        name = next(n for n in patch_map.layers if n.endswith(f"layers.{index}.mlp"))
        assert torch.equal(patch_map.layers[name], table[3 + torch.arange(patches)].view(4, 4))


def test_report_files(tmp_path):
    model = mome.create_model(
        "vmoe_tiny_patch8_e4", router="hash", top_k=1, moe_kwargs={**NO_AUX, "capacity_factor": 0.75}
    ).eval()
    recorder = _capture(model, torch.randn(2, 3, 32, 32), indices=[0, 1])
    report = {"model": "vmoe", **recorder.report()}
    written = write_routing_report(report, tmp_path, recorder.patch_maps)
    assert written["patch_map"].read_bytes()[:8] == PNG
    saved = json.loads(written["patches"].read_text())
    assert saved["model"] == "vmoe" and [image["index"] for image in saved["images"]] == [0, 1]
    assert saved["layers"]["blocks.1.mlp"] == {"kind": "sparse", "num_experts": 4, "prefix_tokens": 1}
    for image, patch_map in zip(saved["images"], recorder.patch_maps):
        assert image["patch_grid"] == [4, 4]
        assert image["layers"] == {name: grid.tolist() for name, grid in patch_map.layers.items()}
    assert min(v for image in saved["images"] for g in image["layers"].values() for row in g for v in row) == -1
    assert "patch_map" not in write_routing_report(report, tmp_path / "none")  # no maps, no figure


def test_mome_eval_writes_the_patch_map(tmp_path):
    overrides = ["model=vmoe_tiny_patch8_e4", "+model.num_classes=10", "eval_task=classification", "max_samples=6"]
    out = tmp_path / "eval"
    evaluate(compose_eval(out, [*overrides, "routing_maps=4", *FAST]))
    assert (out / "routing_patch_map.png").read_bytes()[:8] == PNG
    saved = json.loads((out / "routing_patches.json").read_text())
    assert [image["index"] for image in saved["images"]] == [0, 1, 2, 3]  # the first 4 images of the split
    assert all(image["patch_grid"] == [4, 4] for image in saved["images"])
    off = tmp_path / "off"
    evaluate(compose_eval(off, [*overrides, "routing_maps=0", *FAST]))
    assert (off / "routing.json").exists() and not (off / "routing_patch_map.png").exists()
    assert not (off / "routing_patches.json").exists()


@pytest.mark.parametrize("value", ["-1", "two"])
def test_routing_maps_must_be_a_count(tmp_path, capsys, value):
    _fails_early(tmp_path, capsys, ["model=vmoe_tiny_patch8_e4", f"routing_maps={value}"], "routing_maps=")
