"""``mome.upcycle`` on whole models: for every source it accepts (timm ViT, open_clip CLIP, transformers
causal LM), built by the upstream library itself with random weights, the freshly upcycled model computes
the dense model's function (renormalised top-k, dropless), and it saves with ``mome.save_pretrained`` and
reloads with ``mome.create_model("local-dir:...")`` bitwise (state and outputs)."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
from torch import nn

import mome
from mome.layers import MoE, SoftMoE
from mome.models import MoEVisionTransformer

#: fp32 difference allowed between the upcycled and the dense model (see max_diffs)
TOLERANCE = 1e-5


def randomise(model: nn.Module) -> nn.Module:
    """Every parameter redrawn (seeded): non-trivial weights, norms around 1 and biases around 1."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(noise + (1.0 if param.dim() == 1 else 0.0))
    return model


def dense_vit(**kwargs):
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **kwargs}).eval()


def tiny_clip(vision=None, text=None, **kwargs):
    from open_clip.model import CLIP

    vision_cfg = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16, **(vision or {}))
    text_cfg = dict(context_length=16, vocab_size=100, width=64, heads=4, layers=2, **(text or {}))
    return CLIP(32, vision_cfg=vision_cfg, text_cfg=text_cfg, **kwargs).eval()


def causal_lm(name):
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    builders = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2)),
        "phi": lambda: PhiForCausalLM(PhiConfig(**common)),
    }
    return builders[name]().eval()


@dataclass(frozen=True)
class Source:
    """A dense model built by its own library, and the outputs that upcycling must keep."""

    build: Callable[[], nn.Module]
    outputs: Callable[[nn.Module], dict[str, torch.Tensor]]


def vit_outputs(model):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return {"logits": model(x), "features": model.forward_features(x)}


def clip_outputs(model):
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, 32, 32, generator=generator)
    text = torch.randint(1, 100, (2, 16), generator=generator)
    text[1, 9:] = 0  # padding after the end-of-text token (the argmax)
    text[:, 8] = 99
    image_features, text_features, *scales = model(image, text)  # + logit_bias for SigLIP
    return {
        "image_embedding": model.encode_image(image),
        "text_embedding": model.encode_text(text),
        "image_features": image_features,
        "text_features": text_features,
        **{f"logit_scale_{i}": scale for i, scale in enumerate(scales)},
    }


def lm_outputs(model):
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    return {"logits": model(ids).logits}


SOURCES = {
    "timm-vit": Source(lambda: randomise(dense_vit()), vit_outputs),
    "timm-vit-qknorm-layerscale-gap-gelu_tanh": Source(
        lambda: randomise(
            dense_vit(qk_norm=True, init_values=0.5, global_pool="avg", class_token=False, act_layer="gelu_tanh")
        ),
        vit_outputs,
    ),
    "timm-vit-registers-prenorm": Source(
        lambda: randomise(dense_vit(reg_tokens=2, no_embed_class=True, pre_norm=True)), vit_outputs
    ),
    "open_clip": Source(lambda: randomise(tiny_clip()), clip_outputs),
    "open_clip-quickgelu-layerscale-avgpool-projbias": Source(
        lambda: randomise(
            tiny_clip(
                vision=dict(ls_init_value=0.5, pool_type="avg", final_ln_after_pool=True),
                text=dict(ls_init_value=0.5, proj_bias=True, no_causal_mask=True),
                quick_gelu=True,
            )
        ),
        clip_outputs,
    ),
    "open_clip-siglip-bias": Source(lambda: randomise(tiny_clip(init_logit_bias=-10.0)), clip_outputs),
    "llama": Source(lambda: causal_lm("llama"), lm_outputs),
    "qwen2": Source(lambda: causal_lm("qwen2"), lm_outputs),
    "phi": Source(lambda: causal_lm("phi"), lm_outputs),
}

ARCH = {"timm": "upcycled_timm_vit", "open_clip": "upcycled_open_clip"}


def arch_of(source: str) -> str:
    return ARCH.get(source.split("-")[0], "upcycled_causal_lm")


def moe_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, (MoE, SoftMoE))]


def max_diffs(ours, theirs):
    """``max |ours - dense| / max(1, max |dense|)`` per output: absolute for outputs up to 1, relative beyond
    (the ViT features with biases around 1 reach a few hundred)."""
    return {k: (ours[k] - v).abs().max().item() / max(1.0, v.abs().max().item()) for k, v in theirs.items()}


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_upcycled_model_reproduces_the_dense_model(source, top_k):
    spec = SOURCES[source]
    dense = spec.build()
    model = mome.upcycle(dense, num_experts=4, top_k=top_k).eval()
    assert moe_layers(model) and not moe_layers(dense)  # MoE layers in the copy, the dense model untouched
    assert model.mome_model_name == arch_of(source)
    with torch.no_grad():
        diffs = max_diffs(spec.outputs(model), spec.outputs(dense))
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_upcycled_model_saves_and_reloads_exactly(source, tmp_path):
    spec = SOURCES[source]
    model = mome.upcycle(spec.build(), num_experts=4, top_k=2).eval()
    folder = mome.save_pretrained(model, tmp_path / "upcycled")
    reloaded = mome.create_model(f"local-dir:{folder}").eval()
    assert type(reloaded) is type(model) and reloaded.mome_model_name == model.mome_model_name
    assert moe_layers(reloaded) == moe_layers(model)
    ours, theirs = reloaded.state_dict(), model.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)
    with torch.no_grad():
        first, second = spec.outputs(reloaded), spec.outputs(model)
    assert all(torch.equal(first[k], second[k]) for k in second)
    # the memory-aware load (built on the meta device, tensors streamed in place) gives the same model
    low = mome.create_model(f"local-dir:{folder}", low_cpu_mem_usage=True).eval()
    lows = low.state_dict()
    assert list(lows) == list(theirs) and all(torch.equal(lows[k], theirs[k]) for k in lows)
    assert len(list(low.parameters())) == len(list(model.parameters()))
    with torch.no_grad():
        third = spec.outputs(low)
    assert all(torch.equal(third[k], second[k]) for k in second)


def test_every_expert_is_a_copy_and_the_router_is_fresh():
    clip = randomise(tiny_clip())
    model = mome.upcycle(clip, num_experts=4, top_k=1)
    assert moe_layers(model) == ["visual.transformer.resblocks.1.mlp", "transformer.resblocks.1.mlp"]
    dense_mlp = clip.visual.transformer.resblocks[1].mlp
    experts = model.visual.transformer.resblocks[1].mlp.experts
    for e in range(4):
        assert torch.equal(experts.w_in[e], dense_mlp.c_fc.weight) and torch.equal(
            experts.b_out[e], dense_mlp.c_proj.bias
        )
    assert model.visual.transformer.resblocks[1].mlp.router.proj.weight.abs().sum() > 0


def test_a_bfloat16_model_stays_bfloat16_through_save_and_reload(tmp_path):
    dense = randomise(dense_vit()).to(torch.bfloat16)
    model = mome.upcycle(dense, num_experts=2).eval()
    assert model.mome_model_args["dtype"] == "bfloat16" and next(model.parameters()).dtype == torch.bfloat16
    reloaded = mome.create_model(f"local-dir:{mome.save_pretrained(model, tmp_path / 'm')}")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def test_upcycle_by_timm_name_and_capacity_changes_the_function():
    model = mome.upcycle("timm:test_vit", num_experts=2, moe_layers=[5], capacity_factor=0.25)
    assert model.moe_layer_indices == [5] and model.blocks[5].mlp.capacity_factor == 0.25
    assert model.pretrained_cfg.input_size == (3, 160, 160)
    dense = randomise(dense_vit())
    dropping = mome.upcycle(dense, num_experts=4, top_k=1, capacity_factor=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (dropping(x) - dense(x)).abs().max() > 1e-3  # tokens over capacity lose their FFN


def test_without_renormalisation_the_function_changes():
    dense = randomise(dense_vit())
    model = mome.upcycle(dense, num_experts=4, top_k=2, renormalize=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max() > 1e-3  # sum of the top-2 probabilities < 1


def test_upcycled_soft_moe_vit_has_copied_experts_and_is_an_initialisation(tmp_path):
    dense = randomise(dense_vit())
    model = mome.upcycle(dense, num_experts=4, moe_type="soft", moe_layers="last_half", slots_per_expert=2).eval()
    assert isinstance(model.blocks[3].mlp, SoftMoE) and model.blocks[3].mlp.slots_per_expert == 2
    assert torch.equal(model.blocks[3].mlp.experts.w_in[3], dense.blocks[3].mlp.fc1.weight)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max() > 1e-3  # slots mix the tokens: not the dense function
    reloaded = mome.create_model(f"local-dir:{mome.save_pretrained(model, tmp_path / 'soft')}").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_unsupported_structures_are_refused():
    from timm.layers import SwiGLUPacked

    with pytest.raises(ValueError, match="cannot rebuild.*GluMlp"):
        mome.upcycle(dense_vit(mlp_layer=SwiGLUPacked, mlp_ratio=2.0), num_experts=2)
    with pytest.raises(TypeError, match="cannot upcycle"):
        mome.upcycle(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="already has MoE layers"):
        mome.upcycle(mome.upcycle(dense_vit(), num_experts=2))
    with pytest.raises(ValueError, match="cannot rebuild this CLIP"):
        mome.upcycle(tiny_clip(vision=dict(attentional_pool=True, attn_pooler_heads=4)), num_experts=2)


def test_upcycled_lm_generates_and_trains_with_aux_losses():
    dense = causal_lm("llama")
    model = mome.upcycle(dense, num_experts=4, top_k=2, moe_layers=[1], aux_loss_weights={"load_balance": 0.01})
    ids = torch.randint(0, 97, (2, 9))
    out = model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 12)
    loss = model.train()(ids, labels=ids).loss
    aux = mome.aux_losses(model)
    assert set(aux) == {"load_balance"}
    (loss + sum(aux.values())).backward()
    assert model.model.layers[1].mlp.router.proj.weight.grad.abs().sum() > 0


def test_a_callable_router_runs_but_is_not_savable(tmp_path):
    from mome.layers import TopKRouter

    model = mome.upcycle(causal_lm("llama"), num_experts=2, router=lambda dim, e: TopKRouter(dim, e, 1))
    assert not hasattr(model, "mome_model_name")
    with pytest.raises(ValueError, match="not built by mome.create_model"):
        mome.save_pretrained(model, tmp_path / "m")


def test_upcycled_architectures_build_by_name():
    assert set(mome.list_models("upcycled_*")) == {"upcycled_causal_lm", "upcycled_open_clip", "upcycled_timm_vit"}
    with torch.device("meta"):
        vit = mome.create_model("upcycled_timm_vit", depth=2, num_experts=2)
    assert isinstance(vit, MoEVisionTransformer) and vit.moe_layer_indices == [1]
