"""Mixtures of LoRA experts (``mome.peft``): zero-initialised experts leave a model unchanged, hand-computed small
cases per routing, the instance-level merge, adapter save/load round trips, typed errors, telemetry, and training
runs (``mome-train experiment=*_molora|*_mocle``) that change the adapters only."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import mome
from mome.layers.routers import CausalRoutingError
from mome.peft import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LoRAExpertsConfig,
    LoRAExpertsLinear,
    adapter_state_dict,
    add_lora_experts,
    base_state_dict,
    load_lora_experts,
    lora_experts_layers,
    merge_lora_experts,
    save_lora_experts,
)

ROUTINGS = ["token", "instance", "soft"]


def _config(routing: str, targets, **kwargs) -> LoRAExpertsConfig:
    top_k = None if routing == "soft" else kwargs.pop("top_k", 2)
    return LoRAExpertsConfig(target_modules=targets, routing=routing, top_k=top_k, r=2, num_experts=3, **kwargs)


def _tiny_vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def _tiny_clip():
    from open_clip.model import CLIP

    vision = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16)
    text = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2)
    return CLIP(16, vision_cfg=vision, text_cfg=text)


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


# (builder, targets, forward); each model is in eval mode and run without grad
MODELS = {
    "timm_vit": (_tiny_vit, ["qkv", "fc1"], lambda m: m(torch.randn(2, 3, 32, 32))),
    "open_clip": (
        _tiny_clip,
        r".*mlp\.c_fc",
        lambda m: m.encode_image(torch.randn(2, 3, 32, 32)) + m.encode_text(torch.randint(0, 100, (2, 16))),
    ),
    "limoe": (
        lambda: mome.create_model("limoe_tiny_patch8_e4"),
        ["qkv", "fc2"],
        lambda m: m.encode_image(torch.randn(2, 3, 32, 32)),
    ),
    "llama": (_tiny_lm, ["q_proj", "v_proj", "up_proj"], lambda m: m(torch.randint(0, 64, (2, 7))).logits),
}


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("family", sorted(MODELS))
def test_zero_initialised_experts_leave_the_model_unchanged(family, routing):
    build, targets, run = MODELS[family]
    torch.manual_seed(0)
    # frozen before the reference too: torch's MultiheadAttention takes another kernel path (open_clip's text tower)
    # when no parameter requires grad, and add_lora_experts freezes the base
    model = build().eval().requires_grad_(False)
    with torch.no_grad():
        torch.manual_seed(1)
        reference = run(model)
        adapted = add_lora_experts(model, _config(routing, targets), allow_noncausal=True)
        torch.manual_seed(1)
        output = run(model)
    assert adapted and all(isinstance(model.get_submodule(name), LoRAExpertsLinear) for name in adapted)
    assert torch.equal(output, reference)  # B = 0: each delta is exactly 0


def _layer(routing: str, top_k: int | None = 1, renormalize: bool = False, alpha: float = 1.0) -> LoRAExpertsLinear:
    """D=2, r=1, E=2, s = alpha / r = 1: W = I, b = 0; expert 0: A=[1, 0], B=[1, 0]^T; expert 1: A=[0, 1],
    B=[0, 2]^T; router logits = x (W_r = I)."""
    config = LoRAExpertsConfig(
        target_modules=["lin"],
        r=1,
        num_experts=2,
        top_k=top_k,
        routing=routing,
        lora_alpha=alpha,
        renormalize=renormalize,
    )
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
        base.bias.zero_()
    layer = LoRAExpertsLinear(base, config, "lin")
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))  # [E, r, in]
        layer.lora_B.copy_(torch.tensor([[[1.0], [0.0]], [[0.0], [2.0]]]))  # [E, out, r]
        layer.router.proj.weight.copy_(torch.eye(2))
    return layer.eval()


def test_hand_computed_token_top1():
    # token [3, 1]: p = softmax([3, 1]) = [0.8808, 0.1192]; top-1 = expert 0 with weight 0.8808:
    # y = x + 0.8808 * B_0 A_0 x = [3, 1] + 0.8808 * [3, 0] = [5.6424, 1]
    # token [0, 2]: p = softmax([0, 2]) = [0.1192, 0.8808]; expert 1: y = [0, 2] + 0.8808 * [0, 2 * 2] = [0, 5.5232]
    layer = _layer("token")
    x = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    p = 1 / (1 + math.exp(-2))
    expected = torch.tensor([[3 + 3 * p, 1.0], [0.0, 2 + 4 * p]])
    torch.testing.assert_close(layer(x), expected)


def test_hand_computed_soft_mixes_every_expert():
    # token [1, 0]: p = softmax([1, 0]) = [q, 1 - q], q = 0.7311: y = [1, 0] + q * [1, 0] + (1 - q) * [0, 2 * 0]
    # token [0, 1]: p = [1 - q, q]: y = [0, 1] + (1 - q) * [0, 0] + q * [0, 2]
    layer = _layer("soft", top_k=None)
    q = 1 / (1 + math.exp(-1))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(layer(x), torch.tensor([[1 + q, 0.0], [0.0, 1 + 2 * q]]))


def test_hand_computed_instance_routes_the_pooled_sample():
    # sample [[2, 0], [0, 1]]: pooled [1, 0.5], p = softmax = [r, 1 - r], r = 1/(1+e^-0.5) = 0.6225; top-1, renormalised
    # to weight 1: expert 0 for both tokens: [2, 0] -> [2 + 2, 0]; [0, 1] -> [0 + 0, 1]
    layer = _layer("instance", renormalize=True)
    x = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # [B=1, M=2, D=2]
    torch.testing.assert_close(layer(x), torch.tensor([[[4.0, 0.0], [0.0, 1.0]]]))
    torch.testing.assert_close(layer.last_gates, torch.tensor([[1.0, 0.0]]))


def test_scaling_is_alpha_over_r():
    layer, doubled = _layer("token"), _layer("token", alpha=2.0)
    x = torch.tensor([[3.0, 1.0]])
    torch.testing.assert_close(doubled(x) - x, 2 * (layer(x) - x))


def _limoe_with_experts(routing: str, **kwargs):
    torch.manual_seed(0)
    model = mome.create_model("limoe_tiny_patch8_e4").eval()
    add_lora_experts(model, _config(routing, ["qkv", "fc1"], init_lora_weights=False, **kwargs))
    return model


def test_instance_merge_equals_the_unmerged_forward():
    model = _limoe_with_experts("instance")
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        routed = model.encode_image(image)
        gates = {name: layer.last_gates[0].clone() for name, layer in lora_experts_layers(model).items()}
        merge_lora_experts(model)  # the gates of this one sample
        merged = model.encode_image(image)
    assert not lora_experts_layers(model)
    assert all(g.count_nonzero() == 2 for g in gates.values())  # top-2 of 3: a real mixture was merged
    torch.testing.assert_close(merged, routed, rtol=1e-5, atol=1e-5)
    state = model.state_dict()  # the base architecture again: a fresh LIMoE loads it
    mome.create_model("limoe_tiny_patch8_e4").load_state_dict(state, strict=True)


@pytest.mark.parametrize("routing", ["token", "soft"])
def test_token_level_routing_refuses_to_merge(routing):
    model = _limoe_with_experts(routing)
    with pytest.raises(mome.UnsupportedOptionError, match=r"blocks\.0\.attn\.qkv.*no single dense"):
        merge_lora_experts(model, torch.ones(3) / 3)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_adapter_round_trip_is_bitwise(routing, tmp_path):
    model = _limoe_with_experts(routing)
    with torch.no_grad():  # trained-looking adapters: every tensor differs from a fresh init
        for value in adapter_state_dict(model).values():
            value.add_(torch.randn_like(value) * 0.1)
    folder = save_lora_experts(model, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file

    assert (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) == (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)  # peft's layout
    saved = load_file(str(folder / ADAPTER_WEIGHTS_NAME))
    assert set(saved) == {f"base_model.model.{k}" for k in adapter_state_dict(model)}  # the adapters only
    assert not any("base_layer" in key for key in saved)
    torch.manual_seed(0)
    fresh = mome.create_model("limoe_tiny_patch8_e4").eval()  # the same base weights (same seed)
    load_lora_experts(fresh, folder)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(image), model.encode_image(image))
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(fresh)[key], value), key


def test_save_pretrained_keeps_the_adapters_and_create_model_adds_them_back(tmp_path):
    model = _limoe_with_experts("token")
    mome.save_pretrained(model, tmp_path / "saved")
    files = json.loads((tmp_path / "saved" / "config.json").read_text())["files"]
    assert {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME} <= set(files)
    loaded = mome.create_model(f"local-dir:{tmp_path / 'saved'}").eval()
    assert sorted(lora_experts_layers(loaded)) == sorted(lora_experts_layers(model))
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(image), model.encode_image(image))
    assert set(base_state_dict(loaded)) == set(mome.create_model("limoe_tiny_patch8_e4").state_dict())
    low = mome.create_model(f"local-dir:{tmp_path / 'saved'}", low_cpu_mem_usage=True).eval()  # memory-aware
    with torch.no_grad():
        assert torch.equal(low.encode_image(image), model.encode_image(image))


def test_loading_into_another_architecture_names_the_key(tmp_path):
    folder = save_lora_experts(_limoe_with_experts("token"), tmp_path / "adapter")
    wider = mome.create_model("vlmo_tiny_patch8_32")  # also has qkv and fc1 layers, of other widths and places
    with pytest.raises(mome.CheckpointMismatchError, match=r"blocks\.\d\.(attn\.qkv|mlp\.fc1)"):
        load_lora_experts(wider, folder)
    assert not lora_experts_layers(wider)  # left as it was
    with pytest.raises(mome.InvalidArgumentError, match="'qkv'"):  # no layer the saved patterns name
        load_lora_experts(_tiny_lm(), folder)


def test_a_pattern_that_matches_nothing_is_named():
    model = mome.create_model("limoe_tiny_patch8_e4")
    with pytest.raises(mome.InvalidArgumentError, match="target_modules.*'qkvv'"):
        add_lora_experts(model, _config("token", ["qkv", "qkvv"]))
    assert not lora_experts_layers(model)
    with pytest.raises(mome.InvalidArgumentError, match=r"'blocks\\\\.9\\\\..*'"):
        add_lora_experts(model, _config("token", r"blocks\.9\..*"))
    with pytest.raises(mome.UnsupportedModelError, match="'blocks.0.mlp'.*not an nn.Linear"):
        add_lora_experts(model, _config("token", ["mlp"]))


def test_a_rank_above_the_layer_names_the_layer():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    config = LoRAExpertsConfig(target_modules=r"\d", r=8, num_experts=2)
    expected = r"r must be at most min\(in_features, out_features\)=4 for '1'"
    with pytest.raises(mome.InvalidArgumentError, match=expected):
        add_lora_experts(model, config)
    assert isinstance(model[0], nn.Linear)  # nothing replaced


def test_bad_options_are_typed_errors():
    with pytest.raises(mome.InvalidArgumentError, match="top_k"):
        LoRAExpertsConfig(target_modules=["q"], num_experts=2, top_k=3)
    with pytest.raises(mome.UnsupportedOptionError, match="top_k"):
        LoRAExpertsConfig(target_modules=["q"], routing="soft", top_k=2)
    with pytest.raises(mome.InvalidArgumentError, match="routing"):
        LoRAExpertsConfig(target_modules=["q"], routing="cluster")
    with pytest.raises(mome.InvalidArgumentError, match="aux_loss_weights"):
        LoRAExpertsConfig(target_modules=["q"], aux_loss_weights={"balance": 1.0})
    with pytest.raises(CausalRoutingError, match="instance"):  # the pooled routing would see later tokens
        add_lora_experts(_tiny_lm(), _config("instance", ["q_proj"]))


def test_aux_losses_and_routing_stats_are_those_of_every_moe_layer():
    model = _limoe_with_experts("token", aux_loss_weights={"load_balance": 0.01, "z_loss": 0.001})
    model.train()
    model.encode_image(torch.randn(2, 3, 32, 32))
    stats = mome.routing_stats(model)
    adapted = sorted(lora_experts_layers(model))
    assert set(adapted) <= set(stats)
    for name in adapted:
        assert stats[name]["expert_load"].shape == (3,)
        torch.testing.assert_close(stats[name]["expert_load"].sum(), torch.tensor(1.0))
        assert {"router_entropy", "dropped_fraction", "loss/load_balance", "loss/z_loss"} <= set(stats[name])
    losses = mome.aux_losses(model)
    assert {"load_balance", "z_loss"} <= set(losses) and all(v.requires_grad for v in losses.values())


def test_only_the_adapters_train():
    model = _limoe_with_experts("token")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all((".lora_" in n or ".router." in n) and "base_layer" not in n for n in trainable)
    assert not any(n.startswith("blocks.1.mlp.router") for n in trainable)  # the LIMoE MoE's own router stays frozen


def _train_and_check_frozen(name, tmp_path, monkeypatch, extra=(), eval_extra=()):
    """``mome-train experiment=<name>`` as its header says (shortened, tests/test_experiments.py), then: the base
    weights are bitwise those the run started from, adapters moved, and the export evaluates (``mome-eval``)."""
    from test_experiments import run_experiment

    import mome.cli.train as cli_train

    started: dict[str, torch.Tensor] = {}
    build_task = cli_train.build_task

    def spy(cfg):
        task = build_task(cfg)
        started.update({k: v.detach().clone() for k, v in task.model.state_dict().items()})
        return task

    monkeypatch.setattr(cli_train, "build_task", spy)
    tasks = []
    train = cli_train.train
    monkeypatch.setattr("test_experiments.train", lambda cfg: tasks.append(train(cfg)) or tasks[-1])
    run_experiment(name, tmp_path, {}, ["data.num_workers=0", *extra], ["max_samples=4", *eval_extra])
    model = tasks[0][1]["task"].model
    adapters = adapter_state_dict(model)
    moved = [key for key, value in adapters.items() if "lora_B" in key and not torch.equal(value, started[key])]
    assert moved  # the adapters trained (an expert no token chose in 2 steps keeps its B = 0)
    for key, value in model.state_dict().items():
        if key not in adapters:
            assert torch.equal(value, started[key]), f"{key} changed"  # frozen: bitwise the same


@pytest.mark.slow
def test_limoe_molora_trains_only_the_adapters(tmp_path, monkeypatch):
    _train_and_check_frozen("limoe_digits_molora", tmp_path, monkeypatch)


@pytest.mark.slow
def test_vlmo_mocle_trains_only_the_adapters(tmp_path, monkeypatch):
    _train_and_check_frozen("vlmo_digits_mocle", tmp_path, monkeypatch)


@pytest.mark.slow
def test_moe_llava_molora_tunes_the_stage2_model(tmp_path, monkeypatch):
    stage2 = mome.create_model("moe_llava_tiny_e4", moe_layers="none")  # what experiment=..._stage2 exports
    mome.save_pretrained(stage2, tmp_path / "logs" / "moe_llava_shapes" / "stage2" / "model")
    small = ["data.train_size=8", "data.val_size=4", "data.test_size=4", "data.batch_size=4"]
    _train_and_check_frozen("moe_llava_shapes_molora", tmp_path, monkeypatch, small, small)
