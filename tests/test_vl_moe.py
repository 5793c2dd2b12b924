"""VL-MoE (Shen et al. 2023): VLMo's multiway transformer with sparse V-MoE / T-MoE modality experts in every other
block, the VL-FFN dense on top; its routing per modality, aux losses, stagewise training and save/reload."""

from __future__ import annotations

import pytest
import torch
from open_clip.loss import ClipLoss
from timm.layers import Mlp

import mome
from mome.layers import ModalityRouter, MultiwayFFN, SparseMoE, TopKRouter
from mome.lit import VLMoTask

TINY = "vl_moe_tiny_patch8_32"


def _inputs(batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, 32, 32, generator=generator)
    text = torch.randint(5, 900, (batch, 16), generator=generator)
    return image, text


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mome.create_model(TINY).eval()


@pytest.mark.parametrize(
    "name, moe_blocks, vl_blocks, experts",
    [
        (TINY, [1, 3], [2, 3], 4),
        ("vl_moe_base_patch16_224_e32", [1, 3, 5, 7, 9, 11], [10, 11], 32),
        ("vl_moe_large_patch16_224_e32", list(range(1, 24, 2)), [21, 22, 23], 32),
    ],
)
def test_sparse_experts_every_other_block_and_a_dense_vl_ffn_on_top(name, moe_blocks, vl_blocks, experts):
    with torch.device("meta"):
        model = mome.create_model(name)
    assert model.moe_layer_indices == moe_blocks
    for i, block in enumerate(model.blocks):
        ffn = block.mlp
        assert isinstance(ffn, MultiwayFFN) and ffn.modalities == ("image", "text")
        if i in moe_blocks:  # V-MoE and T-MoE: one sparse layer per modality, V-MoE's router and capacity
            assert ffn.moe is None and list(ffn.sparse) == ["image", "text"]
            for m, layer in enumerate(ffn.sparse.values()):
                assert isinstance(layer, SparseMoE) and isinstance(layer.router, TopKRouter)
                assert (layer.num_experts, layer.router.top_k, layer.router.noise_std) == (experts, 1, 1.0)
                assert layer.router.batch_priority and layer.default_modality == m
                assert (layer.capacity_factor, layer.capacity_multiple) == (1.05, 4)
                assert layer.aux_loss_weights == {"importance": 0.005, "load": 0.005}
        else:  # VLMo's dense V-FFN and L-FFN
            assert ffn.sparse is None and isinstance(ffn.moe.router, ModalityRouter)
        assert (ffn.vl_ffn is not None) == (i in vl_blocks)
        assert ffn.vl_ffn is None or isinstance(ffn.vl_ffn, Mlp)  # the VL-FFN is dense
    assert model.pretrained_cfg.paper_ids == "arXiv:2303.07226"
    assert "No VL-MoE weights" in model.pretrained_cfg.notes and not mome.list_pretrained("vl_moe_*")


def test_each_modality_reaches_only_its_own_sparse_experts(model):
    image, text = _inputs()
    received = {}

    def record(key):
        def hook(module, args):
            received[key] = tuple(args[0].shape)

        return hook

    hooks = [
        layer.register_forward_pre_hook(record(f"{i}.{m}"))
        for i in model.moe_layer_indices
        for m, layer in model.blocks[i].mlp.sparse.items()
    ]
    try:
        with torch.no_grad():
            model.forward_fusion(image, text)
    finally:
        for hook in hooks:
            hook.remove()
    # fusion: block 1 routes the 3 x 17 image tokens to V-MoE and the 3 x 16 text tokens to T-MoE;
    # block 3 is a fusion block: every token takes the dense VL-FFN, no sparse layer runs
    assert received == {"1.image": (3 * 17, 64), "1.text": (3 * 16, 64)}
    stats = mome.routing_stats(model)
    assert not any(name.startswith("blocks.3.") for name in stats)
    for m, name in enumerate(("image", "text")):
        load = stats[f"blocks.1.mlp.sparse.{name}"]["expert_load_per_modality"]  # [M, E]
        assert load.shape == (2, 4) and float(load[m].sum()) == pytest.approx(1.0) and float(load[1 - m].sum()) == 0


def test_the_text_experts_do_not_change_the_image_path_and_vice_versa(model):
    image, text = _inputs()
    with torch.no_grad():
        image_before, text_before = model.encode_image(image), model.encode_text(text)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        for i in model.moe_layer_indices:
            model.blocks[i].mlp.sparse["text"].experts.w_out.mul_(3.0)
        torch.testing.assert_close(model.encode_image(image), image_before, rtol=0, atol=0)
        assert not torch.allclose(model.encode_text(text), text_before)
        model.load_state_dict(saved)
        for i in model.moe_layer_indices:
            model.blocks[i].mlp.sparse["image"].experts.w_out.mul_(3.0)
        torch.testing.assert_close(model.encode_text(text), text_before, rtol=0, atol=0)
        assert not torch.allclose(model.encode_image(image), image_before)
        model.load_state_dict(saved)


def test_image_path_routes_its_top_block_through_v_moe_and_records_the_losses():
    torch.manual_seed(0)
    model = mome.create_model(TINY).train()
    image, _ = _inputs()
    model.encode_image(image)
    stats = mome.routing_stats(model)
    assert sorted(n for n in stats if ".sparse." in n) == ["blocks.1.mlp.sparse.image", "blocks.3.mlp.sparse.image"]
    aux = mome.aux_losses(model)
    assert set(aux) == {"importance", "load"}
    for name in ("importance", "load"):  # the weighted sum over the two V-MoE layers of their raw losses
        raw = sum(stats[f"blocks.{i}.mlp.sparse.image"][f"loss/{name}"] for i in (1, 3))
        torch.testing.assert_close(aux[name].detach(), 0.005 * raw)
        assert aux[name].requires_grad


def _task():
    torch.manual_seed(0)
    task = VLMoTask(model={"model_name": TINY}, schedule=[{"stage": "image", "epochs": 1}, {"stage": "image_text"}])
    task.clip_loss = ClipLoss()
    return task


def _batch(task):
    words = ["one", "two", "three", "four", "one", "two"]
    return {
        "image": torch.randn(6, 3, 32, 32),
        "text": task.tokenizer([f"handwritten {w}." for w in words]),
        "label": torch.tensor([1, 2, 3, 4, 1, 2]),
    }


def test_every_pass_of_a_stage_adds_its_aux_losses():
    """The image-text stage runs the image, text and fusion paths; the aux losses of each pass count: the V-MoE of
    fusion block 3 runs only in the image pass (ITC), and its router still gets the aux losses' gradient."""
    task = _task()
    task.stage_losses(_batch(task), "image_text")
    aux = task.step_aux_losses()
    assert set(aux) == {"importance", "load"}
    sum(aux.values()).backward()
    for name in ("image", "text"):
        grad = task.model.blocks[3].mlp.sparse[name].router.proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_text_stage_trains_the_t_moe_and_freezes_the_v_moe():
    task = _task()
    optimizer = torch.optim.AdamW([*task.model.parameters(), task.mask_embedding, *task.mim_head.parameters()], lr=1e-2)
    task._freeze_for("image")  # an image step first: AdamW then holds momentum for the V-MoE experts
    (task.stage_losses(_batch(task), "image")["mim_loss"] + sum(task.step_aux_losses().values())).backward()
    optimizer.step()
    optimizer.zero_grad()
    task._freeze_for("text")
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    loss = task.stage_losses(_batch(task), "text")["mlm_loss"] + sum(task.step_aux_losses().values())
    loss.backward()
    optimizer.step()
    task.on_train_batch_end(None, None, 0)
    after = dict(task.model.named_parameters())
    for i in (1, 3):
        for part in ("router.proj.weight", "experts.w_in", "experts.w_out"):
            image, text = f"blocks.{i}.mlp.sparse.image.{part}", f"blocks.{i}.mlp.sparse.text.{part}"
            assert torch.equal(after[image], before[image]), image
            assert not torch.equal(after[text], before[text]), text
    assert torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])


def test_save_and_reload_through_the_registry(tmp_path, model):
    image, text = _inputs()
    mome.save_pretrained(model, tmp_path / "vl_moe")
    loaded = mome.create_model(f"local-dir:{tmp_path / 'vl_moe'}").eval()
    assert loaded.mome_model_name == TINY and loaded.moe_layer_indices == [1, 3]
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(image), model.encode_image(image), rtol=0, atol=0)
        torch.testing.assert_close(loaded.itm_logits(image, text), model.itm_logits(image, text), rtol=0, atol=0)


def test_bad_options_are_typed_errors_naming_the_model():
    with pytest.raises(mome.InvalidArgumentError, match=r"vl_moe_tiny_patch8_32.*top_k"):
        mome.create_model(TINY, top_k=5)
    with pytest.raises(mome.UnsupportedOptionError, match=r"moe_kwargs\['num_experts'\]"):
        mome.create_model(TINY, moe_kwargs={"num_experts": 8})
    with pytest.raises(mome.UnsupportedOptionError, match="moe"):
        mome.create_model(TINY, moe={"num_experts": 2})
    with pytest.raises(mome.InvalidArgumentError, match="moe_layers"):
        mome.create_model(TINY, moe_layers=[4])
    with pytest.raises(mome.UnsupportedOptionError, match="moe_layers='none' has none"):
        mome.create_model("vlmo_tiny_patch8_32", moe={"num_experts": 2})
    with pytest.raises(mome.InvalidArgumentError, match="moe"):
        mome.create_model("vlmo_tiny_patch8_32", moe_layers="every_2")
