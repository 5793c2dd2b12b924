"""Property-based fuzzing of every family's constructor and forward boundary (the tiny variant of each).

Drawn constructor kwargs (valid and invalid sizes, counts, ratios, layer types, unknown options) either raise a
:class:`mome.MomeError` or build a model whose forward on a well-formed batch is finite and of the right shape;
drawn forward inputs (ranks, channels, sizes, dtypes, batches of 0-2, token ids in and outside the vocabulary,
text lengths) either raise a :class:`mome.MomeError` or give a finite output of the right shape. Any other
exception type fails. Examples run: ``len(FAMILIES) * (CONSTRUCT_EXAMPLES + FORWARD_EXAMPLES)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mome

#: Drawn constructor configurations per family.
CONSTRUCT_EXAMPLES = 12
#: Drawn forward inputs per family (one model per family, built once).
FORWARD_EXAMPLES = 25

FAMILIES = ["vmoe_tiny_patch8_e4", "soft_moe_vit_tiny_patch8_e8", "limoe_tiny_patch8_e4", "vlmo_tiny_patch8_32"]
LLAVA = "moe_llava_tiny_e4"

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Small widths keep every drawn model cheap; the bad values are the ones each check exists for.
_VISION = {
    "img_size": st.sampled_from([16, 24, 32, 30, 0, -8, "32"]),
    "patch_size": st.sampled_from([8, 8, 4, 0, 3]),
    "depth": st.sampled_from([1, 2, 0, -1, 2.0]),
    "num_heads": st.sampled_from([1, 2, 4, 3, 0]),
    "mlp_ratio": st.sampled_from([1.0, 2.0, 0.0, -1.0, math.nan, math.inf]),
    "no_such_option": st.just(1),
}
_MOE = {
    "num_experts": st.sampled_from([1, 2, 4, 0, -2, 2.5]),
    "top_k": st.sampled_from([1, 2, 3, 0, 9, True]),
    "moe_type": st.sampled_from(["sparse", "soft", "modality_pools", "dense"]),
    "slots_per_expert": st.sampled_from([1, 2, 0]),
    "router": st.sampled_from(["top_k", "noisy_top_k", "expert_choice", "no_router"]),
    "moe_layers": st.sampled_from(["every_2", "all", "none", "last_1", "sometimes", [0], [7]]),
}
KWARGS = {
    "vmoe_tiny_patch8_e4": {
        **_VISION,
        **_MOE,
        "embed_dim": st.sampled_from([16, 32, 30, -16]),
        "num_classes": st.sampled_from([0, 3, -1]),
        "group_size_images": st.sampled_from([None, 1, 0]),
    },
    "soft_moe_vit_tiny_patch8_e8": {
        **_VISION,
        **_MOE,
        "embed_dim": st.sampled_from([16, 32, 30]),
        "num_classes": st.sampled_from([0, 3, -1]),
    },
    "limoe_tiny_patch8_e4": {
        **_VISION,
        **_MOE,
        "width": st.sampled_from([16, 32, 30]),
        "embed_dim": st.sampled_from([8, 0]),
        "context_length": st.sampled_from([4, 16, 0]),
        "vocab_size": st.sampled_from([100, 0]),
    },
    "vlmo_tiny_patch8_32": {
        **_VISION,
        "embed_dim": st.sampled_from([16, 32, 30]),
        "vlffn_start_layer_index": st.sampled_from([0, 1, 5, -1]),
        "max_text_len": st.sampled_from([4, 16, 0]),
        "vocab_size": st.sampled_from([200, 0]),
        "top_k": st.just(2),
    },
    LLAVA: {
        "num_experts": st.sampled_from([2, 4, 0]),
        "top_k": st.sampled_from([1, 2, 9]),
        "capacity_factor": st.sampled_from([1.5, "dropless", 0.0, math.inf, math.nan]),
        "min_capacity": st.sampled_from([0, 4, -1]),
        "moe_layers": st.sampled_from(["every_2_from_0", "none", [1], [9]]),
        "top2_2nd_expert_sampling": st.booleans(),
        "llm": st.sampled_from(["phi", "qwen2", "gpt"]),
        "vision_overrides": st.sampled_from([{"image_size": 16}, {"image_size": 30}, {"no_such_field": 1}]),
        "no_such_option": st.just(1),
    },
}


def _vision_size(model: torch.nn.Module) -> tuple[int, int, int]:
    cfg = model.pretrained_cfg
    return cfg.input_size


def _good_forward(name: str, model: torch.nn.Module, batch: int = 1) -> torch.Tensor:
    """A well-formed forward of ``model`` on ``batch`` samples; returns the output checked for its shape."""
    if name == LLAVA:
        ids = torch.randint(5, model.config.text_config.vocab_size, (batch, 5))
        logits = model(input_ids=ids).logits
        assert logits.shape == (batch, 5, model.config.text_config.vocab_size)
        return logits
    image = torch.randn(batch, *_vision_size(model))
    if name.startswith(("vmoe", "soft_moe")):
        out = model(image)
        assert out.shape == (batch, model.num_classes) if model.num_classes else out.shape[0] == batch
        return out
    length = model.context_length if name.startswith("limoe") else model.max_text_len
    text = torch.randint(1, model.vocab_size, (batch, length))
    image_features, text_features, _ = model(image, text)
    assert image_features.shape[0] == text_features.shape[0] == batch
    return torch.cat([image_features, text_features])


def _is_mome_error(error: BaseException) -> bool:
    return isinstance(error, mome.MomeError) and "\n" not in str(error).strip()


@pytest.mark.parametrize("name", [*FAMILIES, LLAVA])
@settings(max_examples=CONSTRUCT_EXAMPLES, **SETTINGS)
@given(data=st.data())
def test_drawn_constructor_kwargs_are_a_typed_error_or_a_working_model(name, data):
    options = KWARGS[name]
    keys = data.draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=4, unique=True), label="keys")
    kwargs = {key: data.draw(options[key], label=key) for key in keys}
    if name != LLAVA:  # keep every model small whatever was drawn
        kwargs.setdefault("depth", 2)
    torch.manual_seed(0)
    try:
        model = mome.create_model(name, **kwargs).eval()
    except Exception as error:  # noqa: BLE001 - the property: only mome's typed errors
        assert _is_mome_error(error), f"{name}({kwargs}) raised {type(error).__name__}: {error}"
        return
    with torch.no_grad():
        out = _good_forward(name, model)
    assert torch.isfinite(out).all(), f"{name}({kwargs}) gave a non-finite output"


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: mome.create_model(name).eval() for name in [*FAMILIES, LLAVA]}


_DTYPES = [torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool]


def _draw_images(data, model) -> torch.Tensor:
    channels, height, width = _vision_size(model)
    batch = data.draw(st.sampled_from([0, 1, 2]), label="batch")
    rank = data.draw(st.sampled_from([4, 4, 4, 3, 5]), label="rank")
    chans = data.draw(st.sampled_from([channels, channels, 1, 4]), label="channels")
    size = data.draw(st.sampled_from([height, height, height // 2, height + 8]), label="size")
    dtype = data.draw(st.sampled_from(_DTYPES), label="dtype")
    shape = {3: (chans, size, size), 4: (batch, chans, size, size), 5: (batch, 1, chans, size, size)}[rank]
    return torch.randn(shape).to(dtype)


def _draw_ids(data, vocab: int, max_length: int, min_id: int = 0) -> torch.Tensor:
    batch = data.draw(st.sampled_from([0, 1, 2]), label="text batch")
    length = data.draw(st.sampled_from([1, max_length // 2, max_length, max_length + 3, 0]), label="length")
    low, high = data.draw(
        st.sampled_from([(min_id, vocab), (min_id, vocab), (vocab, vocab + 5), (-3, 0)]), label="id range"
    )
    ids = torch.randint(low, high, (batch, length))
    if data.draw(st.booleans(), label="1-D"):
        ids = ids.flatten()
    return ids.float() if data.draw(st.sampled_from([False, False, False, True]), label="float ids") else ids


@pytest.mark.parametrize("name", [*FAMILIES, LLAVA])
@settings(max_examples=FORWARD_EXAMPLES, **SETTINGS)
@given(data=st.data())
def test_drawn_forward_inputs_are_a_typed_error_or_a_finite_output(name, models, data):
    model = models[name]
    try:
        with torch.no_grad():
            if name == LLAVA:
                vocab = model.config.text_config.vocab_size
                ids = _draw_ids(data, vocab, 24, min_id=5)  # ids 0-4 are the special tokens, <image> (4) among them
                images = _draw_images(data, model) if data.draw(st.booleans(), label="with images") else None
                out = model(input_ids=ids, pixel_values=images).logits
                assert out.shape == (*ids.shape, vocab)
            elif name in ("vmoe_tiny_patch8_e4", "soft_moe_vit_tiny_patch8_e8"):
                images = _draw_images(data, model)
                out = model(images)
                assert out.shape == (images.shape[0], model.num_classes)
            else:
                length = model.context_length if name.startswith("limoe") else model.max_text_len
                images = _draw_images(data, model) if data.draw(st.booleans(), label="with images") else None
                text = _draw_ids(data, model.vocab_size, length) if data.draw(st.booleans(), label="text") else None
                if images is None and text is None:
                    images = _draw_images(data, model)
                if name.startswith("vlmo") and images is not None and text is not None:
                    out = model.itm_logits(images, text)
                    assert out.shape == (images.shape[0], 2)
                else:
                    features = model(images, text)
                    given_ = [x for x in (images, text) if x is not None]
                    outs = [f for f in features[:2] if f is not None]
                    assert [o.shape[0] for o in outs] == [x.shape[0] for x in given_]
                    out = torch.cat([o.flatten() for o in outs])
    except Exception as error:  # noqa: BLE001 - the property: only mome's typed errors
        assert _is_mome_error(error), f"{name} raised {type(error).__name__}: {error}"
        return
    assert torch.isfinite(out.float()).all(), f"{name} gave a non-finite output"
