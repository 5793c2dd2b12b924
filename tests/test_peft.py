"""Mixtures of LoRA experts (``mome.peft``): zero-initialised experts leave a model unchanged, hand-computed small
cases per routing, the instance-level merge, adapter save/load round trips, typed errors, telemetry, and training
runs (``mome-train experiment=*_molora|*_mocle``) that change the adapters only."""

from __future__ import annotations

import json
import math
import warnings

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
    adapter_layers,
    adapter_state_dict,
    add_lora_experts,
    base_state_dict,
    discarded_modules,
    load_lora_experts,
    lora_experts_layers,
    merge_lora_experts,
    save_lora_experts,
)

ROUTINGS = ["token", "instance", "soft", "slots"]


def _config(routing: str, targets, **kwargs) -> LoRAExpertsConfig:
    top_k = None if routing in ("soft", "slots") else kwargs.pop("top_k", 2)
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


def _vlmo_fusion(m):
    return m.forward_fusion(torch.randn(2, 3, 32, 32), torch.randint(5, 100, (2, 6)))[0]


def _llava():
    return mome.create_model("moe_llava_tiny_e4")


def _llava_forward_inputs(m):
    ids = [1, 5, *[m.config.image_token_id] * m.num_image_tokens, 17, 18, 9, 6, 8, 20, 22, 3]
    pixels = torch.randn(2, 3, *m.pretrained_cfg["input_size"][1:])
    return {"input_ids": torch.tensor([ids, ids[:3] + ids[3:][::-1]]), "pixel_values": pixels}


def _llava_forward(m):
    return m(**_llava_forward_inputs(m))


# every family's default targets (conf/peft/molora.yaml), each forward reaching the layers the task losses use
REACHED = {
    **{name: MODELS[name] for name in ("timm_vit", "limoe", "llama")},
    "vlmo": (lambda: mome.create_model("vlmo_tiny_patch8_32"), ["qkv", "fc1", "fc2"], _vlmo_fusion),
    "moe_llava": (_llava, ["q_proj", "v_proj", "fc1", "fc2"], lambda m: _llava_forward(m).logits),
}


@pytest.mark.parametrize("family", sorted(REACHED))
def test_every_adapter_gets_a_gradient(family):
    """Each adapted layer must be called as a module: a model that reads ``layer.weight`` into ``F.linear`` would
    bypass the experts (VLMo's attention did, so its qkv experts never trained)."""
    build, targets, run = REACHED[family]
    model = build().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # LLaVA: its unused last vision layer is skipped (tested below)
        add_lora_experts(model, _config("soft", targets, init_lora_weights=False), allow_noncausal=True)
    run(model).float().square().mean().backward()
    no_grad = [
        name
        for name, param in model.named_parameters()
        if ".lora_" in name and (param.grad is None or not param.grad.count_nonzero())
    ]
    assert not no_grad, no_grad


def test_llava_layers_whose_output_is_discarded_get_no_experts():
    """MoE-LLaVA reads the penultimate vision layer (``vision_feature_layer=-2``): its last vision layer feeds
    nothing, so experts there would train on their routers' aux losses only. They are skipped, with a warning."""
    model = _llava()
    last = model.config.vision_config.num_hidden_layers - 1
    assert model.config.vision_feature_layer == -2
    assert discarded_modules(model) == [f"model.vision_tower.encoder.layers.{last}"]
    with pytest.warns(UserWarning, match=rf"no LoRA experts on .*encoder\.layers\.{last}\.mlp\.fc2"):
        adapted = add_lora_experts(model, _config("token", ["fc2", "q_proj"], init_lora_weights=False))
    assert f"model.vision_tower.encoder.layers.{last - 1}.mlp.fc2" in adapted
    assert not [name for name in adapted if f"encoder.layers.{last}." in name]
    _llava_forward(model).logits.sum().backward()  # the task loss reaches every adapter that was placed
    assert all(p.grad is not None and p.grad.count_nonzero() for n, p in model.named_parameters() if "lora_A" in n)
    pattern = rf"model\.vision_tower\.encoder\.layers\.{last}\.mlp\.fc2"
    with pytest.raises(mome.InvalidArgumentError, match="whose output MoELLaVA uses"):
        add_lora_experts(_llava(), _config("token", pattern))
    assert discarded_modules(mome.create_model("limoe_tiny_patch8_e4")) == []


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
        if routing != "slots":  # slots: the router's keys are set by the test
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


def test_hand_computed_slots_dispatch_and_combine():
    # Omni-SMoLA's slots (P = 1 per expert), slot keys mu = I, scale 1: logits = <x_m, mu_s> = I for the tokens
    # x_0 = [1, 0], x_1 = [0, 1]; q = softmax([1, 0])_0 = 0.7311. Dispatch (over tokens): slot 0 = q x_0 + (1-q) x_1
    # = [q, 1-q], slot 1 = [1-q, q]. Expert 0 (B A = [[1, 0], [0, 0]]) on slot 0: [q, 0]; expert 1 (B A =
    # [[0, 0], [0, 2]]) on slot 1: [0, 2q]. Combine (over slots): token 0 takes [q, 1-q]: delta = [q^2, 2q(1-q)];
    # token 1 takes [1-q, q]: delta = [q(1-q), 2q^2]. y = x + delta.
    layer = _layer("slots", top_k=None)
    with torch.no_grad():
        layer.router.mu.copy_(torch.eye(2))
    q = 1 / (1 + math.exp(-1))
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, M=2, D=2]
    expected = torch.tensor([[[1 + q * q, 2 * q * (1 - q)], [q * (1 - q), 1 + 2 * q * q]]])
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.last_gates, torch.tensor([[0.5, 0.5]]))  # each token's combine: q and 1-q
    stats = layer.last_routing_stats
    torch.testing.assert_close(stats["expert_load"], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(stats["combine_weights_max_mean"], torch.tensor(q))


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


@pytest.mark.parametrize("routing", ["token", "soft", "slots"])
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
    with pytest.raises(mome.UnsupportedOptionError, match="slots_per_expert"):
        LoRAExpertsConfig(target_modules=["q"], routing="token", slots_per_expert=2)
    with pytest.raises(mome.UnsupportedOptionError, match="aux_loss_weights"):
        LoRAExpertsConfig(target_modules=["q"], routing="slots", aux_loss_weights={"load_balance": 0.01})
    with pytest.raises(CausalRoutingError, match="slots"):  # slots mix a sample's tokens, later ones included
        add_lora_experts(_tiny_lm(), _config("slots", ["q_proj"]))
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
    unchanged = [key for key, value in adapters.items() if torch.equal(value, started[key])]
    assert not unchanged, unchanged  # every expert and router trained (A moves once B is no longer 0: 2 steps)
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


# ------------------------------------------------------------------- LoRA on the stacked experts (target_experts)
def _stacked_moe(dispatch: str = "sorted"):
    """D=2, H=2, E=2, identity activation, no biases, w_in = w_out = I; top-1 router with logits = x (renormalised:
    the chosen expert's weight is 1). One LoRA of rank 1 per expert and weight, s = alpha / r = 1:
    expert 0: w_in delta B A = [0, 1]^T [1, 0] = [[0, 0], [1, 0]], w_out delta 0;
    expert 1: w_in delta [1, 0]^T [0, 1] = [[0, 1], [0, 0]], w_out delta [0, 2]^T [1, 0] = [[0, 0], [2, 0]]."""
    from mome.layers import MoE, TopKRouter
    from mome.layers.experts import Experts

    router = TopKRouter(2, 2, 1, renormalize=True)
    experts = Experts(2, 2, 2, act_layer=nn.Identity, bias=False, dispatch=dispatch)
    with torch.no_grad():
        router.proj.weight.copy_(torch.eye(2))
        experts.w_in.copy_(torch.eye(2).expand(2, 2, 2))
        experts.w_out.copy_(torch.eye(2).expand(2, 2, 2))
    model = nn.Sequential(MoE(router, experts, capacity_factor=4.0, eval_capacity_factor=4.0, dispatch=dispatch))
    config = LoRAExpertsConfig(target_experts=["experts"], r=1, lora_alpha=1.0)
    assert add_lora_experts(model, config) == ["0.experts"]
    lora = model[0].experts
    with torch.no_grad():
        lora.lora_A["w_in"].copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))  # [E, r, in]
        lora.lora_B["w_in"].copy_(torch.tensor([[[0.0], [1.0]], [[1.0], [0.0]]]))  # [E, out, r]
        lora.lora_A["w_out"].copy_(torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]]))
        lora.lora_B["w_out"].copy_(torch.tensor([[[0.0], [0.0]], [[0.0], [2.0]]]))
    return model.eval()


@pytest.mark.parametrize("dispatch", ["sorted", "buffers"])
def test_hand_computed_expert_lora_acts_on_the_routed_tokens_only(dispatch):
    # token [3, 1] -> expert 0: (I + [[0, 0], [1, 0]]) [3, 1] = [3, 4], then w_out = I: [3, 4]
    # token [0, 2] -> expert 1: (I + [[0, 1], [0, 0]]) [0, 2] = [2, 2], then (I + [[0, 0], [2, 0]]) [2, 2] = [2, 6]
    # (expert 0's delta on [0, 2] would give [0, 2]: each delta acts only on its expert's tokens)
    model = _stacked_moe(dispatch)
    with torch.no_grad():
        out = model(torch.tensor([[3.0, 1.0], [0.0, 2.0]]))
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0], [2.0, 6.0]]))


def _llava_with_expert_lora(init_lora_weights: bool = False, **kwargs):
    torch.manual_seed(0)
    model = _llava().eval()
    config = LoRAExpertsConfig(target_experts=["experts"], r=2, init_lora_weights=init_lora_weights, **kwargs)
    return model, add_lora_experts(model, config)


def test_zero_initialised_expert_lora_is_the_base_model():
    torch.manual_seed(0)
    base = _llava().eval()
    torch.manual_seed(1)
    inputs = _llava_forward_inputs(base)
    with torch.no_grad():
        reference = base(**inputs).logits
    model, adapted = _llava_with_expert_lora(init_lora_weights=True)
    assert adapted == [f"model.language_model.layers.{i}.mlp.experts" for i in model.moe_layers]
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{name}.lora_{m}.{w}" for name in adapted for m in "AB" for w in ("w_in", "w_out"))


def test_expert_lora_agrees_across_dispatch_paths_forward_and_backward():
    from mome.layers import MoE

    model, _ = _llava_with_expert_lora()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in moes:  # a capacity that drops nothing: both paths compute every assignment
        moe.capacity_factor = moe.eval_capacity_factor = 8.0
    inputs = _llava_forward_inputs(model)
    results = {}
    for dispatch in ("sorted", "buffers"):
        for moe in moes:
            moe.dispatch = dispatch
        model.zero_grad()
        logits = model(**inputs).logits
        logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[dispatch] = (logits.detach(), grads)
    torch.testing.assert_close(results["buffers"][0], results["sorted"][0], rtol=1e-5, atol=1e-5)
    assert results["sorted"][1] and all(g.count_nonzero() for g in results["sorted"][1].values())
    for name, grad in results["sorted"][1].items():
        torch.testing.assert_close(results["buffers"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_expert_lora_round_trip_and_merge(tmp_path):
    model, adapted = _llava_with_expert_lora()
    inputs = _llava_forward_inputs(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    folder = save_lora_experts(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(str(folder / ADAPTER_WEIGHTS_NAME))
    factors = {f"{name}.lora_{m}.{w}" for name in adapted for m in "AB" for w in ("w_in", "w_out")}
    assert set(saved) == {f"base_model.model.{key}" for key in factors}
    torch.manual_seed(0)
    fresh = load_lora_experts(_llava().eval(), folder)  # the same base weights (same seed)
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(fresh)[key], value), key
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, expected)
        merge_lora_experts(fresh)  # w[e] += s B[e] A[e]: the base architecture again
        merged = fresh(**inputs).logits
    assert not adapter_layers(fresh)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    _llava().load_state_dict(fresh.state_dict(), strict=True)


def test_expert_lora_on_quantized_experts_trains_the_factors_only():
    """QLoRA of the experts: ``mome.quantize`` first, then the LoRA factors (float) on the int8 stacked weights."""
    torch.manual_seed(0)
    model = mome.quantize(_llava().eval(), "int8")
    inputs = _llava_forward_inputs(model)
    with torch.no_grad():
        reference = model(**inputs).logits
    add_lora_experts(model, LoRAExpertsConfig(target_experts=["experts"], r=2))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)  # B = 0
    model(**inputs).logits.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".lora_B." in n or not g.count_nonzero() for n, g in grads.items())  # A: 0 while B = 0
    assert all(grads[n].count_nonzero() for n in grads if ".lora_B." in n)
    with pytest.raises(mome.UnsupportedOptionError, match="layers.0.mlp.experts.*quantized"):
        merge_lora_experts(model)


def test_peft_target_parameters_cannot_wrap_mome_experts():
    """Why mome.peft adapts the stacked experts itself: peft 0.21's ``target_parameters`` (its ``ParamWrapper``,
    which does support ``[E, out, in]`` expert tensors) replaces the experts module by a wrapper that forwards no
    attribute, and the MoE layer reads ``experts.dim`` and ``experts.w_in``."""
    from peft import LoraConfig, inject_adapter_in_model

    model = _llava().eval()
    config = LoraConfig(r=2, target_modules=[], target_parameters=["experts.w_in", "experts.w_out"])
    model = inject_adapter_in_model(config, model)
    assert type(model.model.language_model.layers[0].mlp.experts).__name__ == "ParamWrapper"
    with pytest.raises(AttributeError, match="'ParamWrapper' object has no attribute 'dim'"):
        model(**_llava_forward_inputs(model))


def test_expert_lora_bad_input_is_typed():
    with pytest.raises(mome.UnsupportedOptionError, match="lora_dropout"):
        LoRAExpertsConfig(target_experts=["experts"], lora_dropout=0.1)
    with pytest.raises(mome.InvalidArgumentError, match="target_modules"):
        LoRAExpertsConfig()
    with pytest.raises(mome.InvalidArgumentError, match="target_experts.*'expertz'"):
        add_lora_experts(_llava(), LoRAExpertsConfig(target_experts=["expertz"]))
    with pytest.raises(mome.UnsupportedModelError, match="'model.multi_modal_projector.linear_1'.*not an Experts"):
        add_lora_experts(_llava(), LoRAExpertsConfig(target_experts=["linear_1"]))
    rank = r"r must be at most min\(out, in\)=64 .*layers\.0\.mlp\.experts"
    with pytest.raises(mome.InvalidArgumentError, match=rank):
        add_lora_experts(_llava(), LoRAExpertsConfig(target_experts=["experts"], r=65))


@pytest.mark.slow
def test_moe_llava_expert_lora_tunes_the_stage3_model(tmp_path, monkeypatch):
    stage3 = mome.create_model("moe_llava_tiny_e4")  # what experiment=..._stage3 exports (MoE in layers 0 and 2)
    mome.save_pretrained(stage3, tmp_path / "logs" / "moe_llava_shapes" / "stage3" / "model")
    small = ["data.train_size=8", "data.val_size=4", "data.test_size=4", "data.batch_size=4"]
    _train_and_check_frozen("moe_llava_shapes_expert_lora", tmp_path, monkeypatch, small, small)
