"""``mome.upcycle`` on whole models: a freshly upcycled model computes the dense model's function
(dropless, renormalised top-k) for timm ViTs and transformers causal LMs; open_clip CLIP -> LIMoE."""

import pytest
import timm
import torch
from torch import nn

import mome
from mome.layers import MoE, SoftMoE
from mome.models import MoEVisionTransformer


def dense_vit(**kwargs):
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **kwargs}).eval()


def randomise(model):
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2).add_(1.0 if param.dim() == 1 else 0.0)  # non-trivial norms and biases
    return model


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"qk_norm": True, "init_values": 0.5, "global_pool": "avg", "class_token": False, "act_layer": "gelu_tanh"},
        {"reg_tokens": 2, "no_embed_class": True, "pre_norm": True},
    ],
    ids=["plain", "qknorm-layerscale-gap", "registers-prenorm"],
)
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_vit_reproduces_the_dense_vit(variant, top_k):
    dense = randomise(dense_vit(**variant))
    model = mome.upcycle(dense, num_experts=4, top_k=top_k).eval()
    assert isinstance(model, MoEVisionTransformer) and model.moe_layer_indices == [1, 3]
    assert all(isinstance(model.blocks[i].mlp, MoE) for i in (1, 3))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (model(x) - dense(x)).abs().max().item()
    assert diff < 1e-5, diff
    assert not any(isinstance(b.mlp, MoE) for b in dense.blocks)  # the dense model is untouched


def test_upcycle_by_timm_name_and_capacity_changes_the_function():
    model = mome.upcycle("timm:test_vit", num_experts=2, moe_layers=[5], capacity_factor=0.25)
    assert model.moe_layer_indices == [5] and model.blocks[5].mlp.capacity_factor == 0.25
    assert model.pretrained_cfg.input_size == (3, 160, 160)
    dense = randomise(dense_vit())
    dropping = mome.upcycle(dense, num_experts=4, top_k=1, capacity_factor=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (dropping(x) - dense(x)).abs().max() > 1e-3  # tokens over capacity lose their FFN


def test_upcycled_soft_moe_vit_has_copied_experts():
    dense = randomise(dense_vit())
    model = mome.upcycle(dense, num_experts=4, moe_type="soft", moe_layers="last_half", slots_per_expert=2)
    assert isinstance(model.blocks[3].mlp, SoftMoE) and model.blocks[3].mlp.slots_per_expert == 2
    torch.testing.assert_close(model.blocks[3].mlp.experts.w_in[3], dense.blocks[3].mlp.fc1.weight)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_unsupported_vit_structure_is_refused():
    from timm.layers import SwiGLUPacked

    with pytest.raises(ValueError, match="cannot rebuild.*GluMlp"):
        mome.upcycle(dense_vit(mlp_layer=SwiGLUPacked, mlp_ratio=2.0), num_experts=2)
    with pytest.raises(TypeError, match="cannot upcycle"):
        mome.upcycle(nn.Linear(3, 3))


def causal_lms():
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2)),
        "phi": lambda: PhiForCausalLM(PhiConfig(**common)),
    }


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi"])
def test_upcycled_causal_lm_reproduces_the_dense_lm(name):
    dense = causal_lms()[name]().eval()
    model = mome.upcycle(dense, num_experts=4, top_k=2).eval()
    layers = model.model.layers
    assert [i for i, layer in enumerate(layers) if isinstance(layer.mlp, MoE)] == [
        0,
        2,
    ]  # MoE-LLaVA: every other from 0
    assert not isinstance(dense.model.layers[0].mlp, MoE)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        diff = (model(ids).logits - dense(ids).logits).abs().max().item()
    assert diff < 1e-5, diff
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 12)


def test_upcycled_lm_trains_with_aux_losses():
    dense = causal_lms()["llama"]()
    model = mome.upcycle(dense, num_experts=4, top_k=2, moe_layers=[1], aux_loss_weights={"load_balance": 0.01})
    ids = torch.randint(0, 97, (2, 9))
    loss = model(ids, labels=ids).loss
    aux = mome.aux_losses(model)
    assert set(aux) == {"load_balance"}
    (loss + sum(aux.values())).backward()
    assert model.model.layers[1].mlp.router.proj.weight.grad.abs().sum() > 0


def test_open_clip_clip_becomes_a_limoe():
    from open_clip.model import CLIP

    from mome.models.limoe import LIMoE

    clip = CLIP(
        32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=4, layers=2),
    ).eval()
    model = mome.upcycle(clip, num_experts=4, top_k=1).eval()
    assert isinstance(model, LIMoE) and model.moe_layer_indices == [1]
    torch.testing.assert_close(
        model.blocks[1].mlp.experts.w_out[2], clip.visual.transformer.resblocks[1].mlp.c_proj.weight
    )
    with torch.no_grad():
        image, text, scale = model(torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 16)))
    assert image.shape == text.shape == (2, 32)
