"""``mome.quantize``: int8 / int4 weight-only quantization (torchao) of every family, its save/reload, bad input."""

import copy
import json

import pytest
import torch
from torch import nn

import mome
from mome.layers import Experts, SparseMoE
from mome.layers.experts import is_quantized

pytest.importorskip("torchao")

from mome._quant_tensor import GroupwiseIntTensor, pack_int4, unpack_int4  # noqa: E402

FAMILIES = [
    "vmoe_tiny_patch8_e4",
    "soft_moe_vit_tiny_patch8_e8",
    "limoe_tiny_patch8_e4",
    "vlmo_tiny_patch8_32",
    "moe_llava_tiny_e4",
]
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: ``||y_q - y|| / ||y||`` allowed on the random-weight tiny models. Per weight, int8 per-row rounding is an error
#: of ~0.2% (step max|w|/127.5, RMS step/sqrt(12)) and int4 per group of 64 ~6.5% (measured on a uniform matrix);
#: through 4-12 layers of random weights, routing flips included, tools/bench_quantize.py measured up to 2.1% (int8)
#: and 52% (int4, LIMoE's embeddings). The bounds are a few times those, and far below an unrelated output (~141%).
REL_TOLERANCE = {"int8": 0.06, "int4": 0.9}


def family_forward(name, model):
    torch.manual_seed(1)
    if name.startswith("moe_llava"):
        ids = torch.randint(3, 90, (2, 10))
        return lambda m: m(input_ids=ids).logits
    images = torch.randn(2, 3, 32, 32)
    if name.startswith(("limoe", "vlmo")):
        texts = mome.get_tokenizer(name)(["a photo of a 3", "a 7"])
        return lambda m: torch.cat([f.flatten() for f in m(images, texts)[:2]])
    return lambda m: m(images)


def targeted_weights(model):
    """``(name, tensor)`` of every weight mome.quantize targets: stacked experts, Linear outside routers, Embeddings
    of >= 64 rows."""
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            yield f"{name}.w_in", module.w_in
            yield f"{name}.w_out", module.w_out
        elif isinstance(module, nn.Linear) and "router" not in name.split("."):
            yield f"{name}.weight", module.weight
        elif isinstance(module, nn.Embedding) and module.num_embeddings >= 64:
            yield f"{name}.weight", module.weight


def float_weights_left(model):
    return [name for name, weight in targeted_weights(model) if not is_quantized(weight) and weight.dtype in FLOATS]


@pytest.fixture(scope="module")
def models():
    built = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        built[name] = mome.create_model(name).eval()
    return built


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_quantizes_every_expert_weight_and_stays_close(models, name, mode):
    reference = models[name]
    model = mome.quantize(copy.deepcopy(reference), mode)
    assert float_weights_left(model) == []
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and all(is_quantized(e.w_in) and is_quantized(e.w_out) for e in experts)
    assert not any(p.requires_grad for p in model.parameters() if is_quantized(p))
    forward = family_forward(name, reference)
    with torch.no_grad():
        expected, got = forward(reference), forward(model)
    relative = float((got - expected).norm() / expected.norm())
    assert 0 < relative < REL_TOLERANCE[mode], relative
    assert mome.quantization_of(model)["mode"] == mode


def test_the_float_check_catches_a_float_expert_weight(models):
    model = mome.quantize(copy.deepcopy(models["vmoe_tiny_patch8_e4"]), "int8")
    experts = next(m for m in model.modules() if isinstance(m, Experts))
    experts.w_out = nn.Parameter(experts.w_out.dequantize())  # one stacked weight back in fp32
    assert float_weights_left(model) == ["blocks.1.mlp.experts.w_out"]


def routed_layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = SparseMoE(64, 128, 4, top_k=2, capacity_factor=4.0, **kwargs).eval()
    return layer, torch.randn(48, 64)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_sorted_buffers_and_eager_paths_agree_on_a_quantized_layer(mode):
    layer, x = routed_layer()
    mome.quantize(layer, mode)
    with torch.no_grad():
        layer.experts.dispatch = "sorted"
        sorted_out = layer(x)
        layer.experts.dispatch = "buffers"
        buffers_out = layer(x)
        # the eager per-expert fallback of grouped_matmul: rows whose stride is not 16-byte aligned
        layer.experts.dispatch = "sorted"
        wide = torch.nn.functional.pad(x, (0, 1))[:, :64]  # [48, 64] view with row stride 65
        eager_out = layer(wide)
    torch.testing.assert_close(buffers_out, sorted_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eager_out, sorted_out, rtol=1e-5, atol=1e-6)


def test_int8_expert_weights_are_the_hand_computed_quantization():
    """torchao's symmetric per-row int8: ``scale = max|w_row| / 127.5``,
    ``q = clamp(round(w * (1 / scale)), -128, 127)``; the layer's output is bitwise that of the float layer
    holding ``scale * q``."""
    layer, x = routed_layer()
    hand = copy.deepcopy(layer)
    mome.quantize(layer, "int8")
    for name in ("w_in", "w_out"):
        weight = getattr(hand.experts, name).detach()  # [E, out, in]
        scale = weight.abs().amax(dim=-1, keepdim=True) / 127.5  # [E, out, 1]
        q = torch.clamp(torch.round(weight * (1.0 / scale)), -128, 127)  # torchao multiplies by 1 / scale
        quantized = getattr(layer.experts, name)
        assert torch.equal(quantized.qdata, q.to(torch.int8))
        assert torch.equal(quantized.dequantize(), q * scale)
        getattr(hand.experts, name).data = q * scale
    with torch.no_grad():
        for dispatch in ("sorted", "buffers"):
            layer.experts.dispatch = hand.experts.dispatch = dispatch
            assert torch.equal(layer(x), hand(x))


def test_int4_weights_on_the_grid_quantize_exactly():
    """Values ``scale * (q - zero)`` with q in [0, 15], each group spanning the whole range and holding 0, come back
    exactly; the layer's output is then bitwise the fp32 layer's."""
    layer, x = routed_layer()
    reference = copy.deepcopy(layer)
    generator = torch.Generator().manual_seed(3)
    for name in ("w_in", "w_out"):
        weight = getattr(reference.experts, name)  # [E, out, in]
        zero = 5
        q = torch.randint(0, 16, weight.shape, generator=generator)
        q[..., 0::64], q[..., 1::64], q[..., 2::64] = 0, 15, zero  # every group of 64 spans [0, 15] and holds 0
        grid = (q - zero).float() * 2.0**-6  # scale = (max - min) / 15 = 2^-6 exactly
        weight.data.copy_(grid)
    layer.load_state_dict(reference.state_dict())
    mome.quantize(layer, "int4")
    w_in = layer.experts.w_in
    assert isinstance(w_in, GroupwiseIntTensor) and w_in.qdata.shape[-1] == 32  # two values a byte
    assert torch.equal(w_in.scale, torch.full_like(w_in.scale, 2.0**-6))
    assert torch.equal(w_in.zero_point, torch.full_like(w_in.zero_point, zero))
    assert torch.equal(w_in.dequantize(), reference.experts.w_in)
    assert torch.equal(layer.experts.w_out.dequantize(), reference.experts.w_out)
    with torch.no_grad():
        assert torch.equal(layer(x), reference(x))


def test_int4_packing_round_trips_and_puts_the_even_value_in_the_low_nibble():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[1 + (2 << 4), 15]]
    values = torch.randint(0, 16, (3, 5, 8), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(values)), values)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("name", ["vmoe_tiny_patch8_e4", "moe_llava_tiny_e4", "limoe_tiny_patch8_e4"])
def test_a_quantized_model_saves_and_reloads_bitwise(models, name, mode, tmp_path):
    model = mome.quantize(copy.deepcopy(models[name]), mode)
    folder = mome.save_pretrained(model, tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"]["mode"] == mode and config["quantization"]["library"] == "torchao"
    reloaded = mome.create_model(f"local-dir:{folder}").eval()
    assert mome.quantization_of(reloaded) == mome.quantization_of(model)
    assert float_weights_left(reloaded) == []
    forward = family_forward(name, model)
    with torch.no_grad():
        assert torch.equal(forward(reloaded), forward(model))


def test_a_quantized_folder_does_not_load_into_a_float_model_nor_the_reverse(models, tmp_path):
    source = models["vmoe_tiny_patch8_e4"]
    folder = mome.save_pretrained(mome.quantize(copy.deepcopy(source), "int8"), tmp_path / "q")
    with pytest.raises(mome.CheckpointMismatchError, match=r"blocks\.1\.mlp\.experts\.w_in"):
        mome.load_checkpoint(mome.create_model("vmoe_tiny_patch8_e4"), folder / "model.safetensors")
    float_folder = mome.save_pretrained(source, tmp_path / "f", model_name="vmoe_tiny_patch8_e4")
    with pytest.raises(mome.CheckpointMismatchError, match=r"experts\.w_in\.qdata"):
        mome.load_checkpoint(mome.quantize(copy.deepcopy(source), "int8"), float_folder / "model.safetensors")
    with pytest.raises(mome.CheckpointMismatchError, match=r"scale"):  # int8 parts into an int4 model
        mome.load_checkpoint(mome.quantize(copy.deepcopy(source), "int4"), folder / "model.safetensors")


def test_bad_input_gives_one_line_typed_errors(models):
    layer, _ = routed_layer()
    with pytest.raises(mome.InvalidArgumentError, match="mode must be one of") as error:
        mome.quantize(layer, "int3")
    assert "\n" not in str(error.value)
    with pytest.raises(mome.UnsupportedOptionError, match="group_size"):
        mome.quantize(layer, "int8", group_size=32)
    with pytest.raises(mome.InvalidArgumentError, match="group_size must be even"):
        mome.quantize(layer, "int4", group_size=33)
    mome.quantize(layer, "int8")
    with pytest.raises(mome.InvalidArgumentError, match="already quantized|unquantized model"):
        mome.quantize(layer, "int4")
    half, _ = routed_layer()
    half.half()
    with pytest.raises(mome.UnsupportedOptionError, match=r"layer 'experts\.w_in' has dtype torch\.float16"):
        mome.quantize(half, "int8")
    assert not is_quantized(half.experts.w_in)  # refused before anything changed
    odd = nn.Sequential(nn.Linear(63, 8))
    with pytest.raises(mome.UnsupportedModelError, match=r"layer '0\.weight'.*even input width.*got 63"):
        mome.quantize(odd, "int4")
    with pytest.raises(mome.UnsupportedModelError, match="no nn.Linear, nn.Embedding or mome Experts"):
        mome.quantize(nn.Sequential(nn.LayerNorm(8)), "int8")


def test_an_expert_parallel_shard_is_refused_by_name():
    from mome.layers.expert_parallel import ShardedExperts

    layer, _ = routed_layer()
    shard = ShardedExperts.__new__(ShardedExperts)
    nn.Module.__init__(shard)
    layer.experts = shard
    with pytest.raises(mome.UnsupportedModelError, match="layer 'experts' is a ShardedExperts"):
        mome.quantize(layer, "int8")


def test_bfloat16_models_quantize_and_keep_their_dtype():
    layer, x = routed_layer()
    layer.to(torch.bfloat16)
    reference = copy.deepcopy(layer)
    mome.quantize(layer, "int8")
    with torch.no_grad():
        expected, got = reference(x.bfloat16()), layer(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert float((got.float() - expected.float()).norm() / expected.float().norm()) < 0.05


def test_import_mome_does_not_import_torchao():
    import subprocess
    import sys

    code = "import sys, mome; m = mome.create_model('vmoe_tiny_patch8_e4'); print('torchao' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_backward_trains_the_float_parameters_and_leaves_the_quantized_weights_frozen():
    layer, x = routed_layer()
    mome.quantize(layer, "int8").train()
    layer(x.requires_grad_()).sum().backward()
    assert x.grad is not None and layer.experts.b_in.grad is not None and layer.router.proj.weight.grad is not None
    assert layer.experts.w_in.grad is None and not layer.experts.w_in.requires_grad
