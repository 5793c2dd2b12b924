"""``mome.quantize``: weight-only int8 / int4 quantization of every family for inference, built on torchao.

What is quantized (the "targets"): every ``nn.Linear`` outside a router, every ``nn.Embedding`` of at least 64 rows
(vocabularies; smaller tables of positions or token types stay float), and the stacked
expert weights ``w_in [E, H', D]`` / ``w_out [E, D, H]`` of every :class:`~mome.layers.Experts` (the sparse MoE,
Soft MoE, SMEAR and modality-expert layers all keep their experts there). Routers (a module named ``router``, or
inside one), norms, biases, convolutions (patch embeddings) and free parameters (Soft MoE's slot embeddings,
positional embeddings held as ``nn.Parameter``) stay in their float dtype: they are a few percent of the weights,
and routing decides which weights run at all.

Who does what (torchao 0.18):

- ``"int8"``: ``nn.Linear`` through torchao's ``quantize_`` with ``Int8WeightOnlyConfig`` (``Int8Tensor``); the
  stacked experts as torchao ``Int8Tensor.from_hp(w, PerRow())`` on the 3-D tensor (one scale per expert and output
  row); embeddings as :class:`mome._quant_tensor.GroupwiseIntTensor` with 8 bits (one scale and zero point per row).
- ``"int4"``: every target as ``GroupwiseIntTensor`` with 4 bits: torchao's affine quantization primitives, packed
  two values a byte by mome. torchao 0.18's int4 tensors do not fit here: ``Int4WeightOnlyConfig`` needs CUDA
  kernels (``mslk``), ``IntxWeightOnlyConfig(int4)`` keeps a byte per value, and the prototype CPU
  ``Int4OpaqueTensor`` (2-D only) calls torch's ``_weight_int4pack_mm_for_cpu``, which took 30 of the 37 ms of a
  Soft MoE-tiny forward in fp32 on one thread of this project's CPU; the whole fp32 model takes 3.4 ms.

int8 Linear and expert weights are symmetric per output row (torchao): ``scale = max|w_row| / 127.5``,
``q = clamp(round(w / scale), -128, 127)``, ``w ≈ scale * q``; int8 embeddings are asymmetric per row, like int4
with 8 bits. int4 is asymmetric per group of ``g`` input values (default 64, the largest divisor of the
input width up to it): ``scale = (max(w, 0) - min(w, 0)) / 15``, ``w ≈ scale * (q - zero)`` with ``q, zero`` in
``[0, 15]``. The expert forward dequantizes its stacked weights and runs the float grouped matmul / bmm (weight-only:
activations stay float). Quantized weights are frozen (``requires_grad=False``): the model is for inference.

Saving: ``model.state_dict()`` of a quantized model holds each quantized weight as its plain parts
(``<key>.qdata``, ``<key>.scale``, ``<key>.zero_point``),
so :func:`mome.save_pretrained` writes them to ``model.safetensors`` and ``config.json`` records
``"quantization": {"mode", "group_size", "library", "version"}``; ``create_model("local-dir:...")`` rebuilds the
model, quantizes it the same way and loads the parts exactly (strict keys: a quantized folder does not load into
an unquantized model, nor the reverse).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_choice, check_int
from ._errors import InvalidArgumentError, UnsupportedModelError, UnsupportedOptionError
from .layers.experts import Experts, is_quantized

__all__ = ["MODES", "quantization_of", "quantize", "quantize_from_config"]

MODES = ("int8", "int4")
#: the int4 group size along the input axis when none is given
DEFAULT_GROUP_SIZE = 64
_FLOAT_DTYPES = (torch.float32, torch.bfloat16)
#: embedding tables with fewer rows (positions, token types: small, and some models index their ``.weight``
#: directly, which a quantized tensor does not support) stay float
MIN_EMBEDDING_ROWS = 64
_OWNER = "mome.quantize"


class _TorchaoEnumNotice(logging.Filter):
    """Drops torch's deprecation notice for torchao's own Enums (``KernelPreference``, ...). transformers imports
    torchao whenever it is installed (``transformers.quantizers.quantizer_torchao``, at any model load), and
    torchao 0.18 registers its Enums with ``torch.utils._pytree.register_constant``, which torch 2.14 deprecated: two
    log lines on stderr at that import, which broke the one-line errors of mome's command lines. Other classes'
    notices pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not ("is an Enum subclass" in str(record.msg) and getattr(cls, "__module__", "").startswith("torchao"))


logging.getLogger("torch.utils._pytree").addFilter(_TorchaoEnumNotice())


def quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """What :func:`quantize` recorded on ``model`` (``{"mode", "group_size", "library", "version"}``), or None."""
    record = getattr(model, "mome_quantization", None)
    return dict(record) if record else None


def _torchao():
    try:
        import torchao
    except ImportError as err:
        raise UnsupportedOptionError(
            "mode", _OWNER, "quantization needs torchao: pip install 'mome[quant]'", f"{type(err).__name__}: {err}"
        ) from err
    return torchao


def _is_router_path(name: str) -> bool:
    return "router" in name.split(".")


def _group_for(width: int, group_size: int, layer: str, mode: str) -> int:
    group = math.gcd(width, group_size)
    if group % 2:
        raise UnsupportedModelError(
            f"{_OWNER}: layer {layer!r}: {mode} needs an even input width (two values a byte), got {width}"
        )
    return group


def _targets(model: nn.Module, mode: str, group_size: int) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, kind)`` of every layer to quantize, with typed errors before anything changes."""
    from .layers.expert_parallel import ShardedExperts

    targets = []
    for name, module in model.named_modules():
        if isinstance(module, ShardedExperts):
            raise UnsupportedModelError(
                f"{_OWNER}: layer {name!r} is a ShardedExperts (expert-parallel training shard); "
                "unshard it (mome.layers.unshard_experts) and quantize the whole model"
            )
        if isinstance(module, Experts):
            weights = (("w_in", module.w_in), ("w_out", module.w_out))
            kind = "experts"
        elif isinstance(module, nn.Linear) and not _is_router_path(name):
            weights, kind = (("weight", module.weight),), "linear"
        elif isinstance(module, nn.Embedding) and module.num_embeddings >= MIN_EMBEDDING_ROWS:
            weights, kind = (("weight", module.weight),), "embedding"
        else:
            continue
        for attr, weight in weights:
            layer = f"{name}.{attr}" if name else attr
            if is_quantized(weight):
                raise InvalidArgumentError(
                    "model", "an unquantized model", f"{layer} is already a {type(weight).__name__}", _OWNER
                )
            if weight.dtype not in _FLOAT_DTYPES:
                reason = f"layer {layer!r} has dtype {weight.dtype}; {mode} quantizes float32 or bfloat16"
                raise UnsupportedOptionError("mode", _OWNER, reason, mode)
            if mode == "int4":
                _group_for(weight.shape[-1], group_size, layer, mode)
        targets.append((name, module, kind))
    return targets


def quantize(model: nn.Module, mode: str, *, group_size: int | None = None) -> nn.Module:
    """Quantize ``model``'s weights in place for inference, weight-only, with torchao; returns ``model``.

    Args:
        model: any mome model (or module): its ``nn.Linear`` (outside routers), ``nn.Embedding`` and
            :class:`~mome.layers.Experts` weights are quantized (see the module docstring for what runs where).
        mode: ``"int8"`` (symmetric, one scale per output row: ``w ≈ scale * q``) or ``"int4"`` (asymmetric, one
            scale and zero point per group of ``group_size`` input values: ``w ≈ scale * (q - zero)``).
        group_size: int4's group size (default 64); a layer whose input width it does not divide gets the largest
            common divisor. int8 takes none (it is per row).

    Raises:
        InvalidArgumentError: an unknown ``mode``, a bad ``group_size``, a model already quantized.
        UnsupportedOptionError: ``group_size`` with int8; a targeted weight in a dtype other than float32/bfloat16
            (the message names the layer); torchao missing.
        UnsupportedModelError: nothing to quantize, an expert-parallel shard, an odd input width for int4 (named).
    """
    check_choice("mode", mode, MODES, owner=_OWNER)
    if mode == "int8" and group_size is not None:
        raise UnsupportedOptionError("group_size", _OWNER, "int8 has one scale per output row", group_size)
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    check_int("group_size", group_size, minimum=2, owner=_OWNER)
    if group_size % 2:
        raise InvalidArgumentError("group_size", "even (two int4 values a byte)", group_size, _OWNER)
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError("model", "an nn.Module", type(model).__name__, _OWNER)
    if quantization_of(model):
        got = f"one quantized to {model.mome_quantization}"
        raise InvalidArgumentError("model", "an unquantized model", got, _OWNER)
    targets = _targets(model, mode, group_size)
    if not targets:
        raise UnsupportedModelError(
            f"{_OWNER}: {type(model).__name__} has no nn.Linear, nn.Embedding or mome Experts weights to quantize"
        )
    torchao = _torchao()
    if mode == "int8":
        _quantize_int8(model, targets)
    else:
        _quantize_int4(model, targets, group_size)
    model.mome_quantization = {
        "mode": mode,
        "group_size": group_size if mode == "int4" else None,
        "library": "torchao",
        "version": torchao.__version__,
    }
    model.register_state_dict_post_hook(_flatten_quantized)
    model.register_load_state_dict_pre_hook(_unflatten_quantized)
    return model


def _frozen(weight: Tensor) -> nn.Parameter:
    return nn.Parameter(weight, requires_grad=False)


def _quantize_int8(model: nn.Module, targets: list) -> None:
    from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerRow

    from ._quant_tensor import GroupwiseIntTensor

    linears = {name for name, _, kind in targets if kind == "linear"}
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in linears)
    for _, module, kind in targets:
        if kind == "embedding":  # one scale and zero point per row: [V, D] -> block [1, D]
            module.weight = _frozen(GroupwiseIntTensor.from_hp(module.weight.detach(), module.weight.shape[-1], bits=8))
        elif kind == "experts":  # [E, out, in]: one scale per (expert, output row), block [1, 1, in]
            module.w_in = _frozen(Int8Tensor.from_hp(module.w_in.detach(), PerRow()))
            module.w_out = _frozen(Int8Tensor.from_hp(module.w_out.detach(), PerRow()))


def _quantize_int4(model: nn.Module, targets: list, group_size: int) -> None:
    from ._quant_tensor import GroupwiseIntTensor

    def packed(weight: Tensor) -> nn.Parameter:  # [..., K]: groups of gcd(K, group_size) along K
        return _frozen(GroupwiseIntTensor.from_hp(weight.detach(), math.gcd(weight.shape[-1], group_size), bits=4))

    for _, module, kind in targets:
        if kind == "experts":
            module.w_in, module.w_out = packed(module.w_in), packed(module.w_out)
        else:
            module.weight = packed(module.weight)


def _quantized_parameters(module: nn.Module, prefix: str):
    for name, param in module.named_parameters():
        if is_quantized(param):
            yield prefix + name, param


def _flatten_quantized(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: each quantized weight ``key`` becomes its plain tensors ``key.<part>`` (safetensors
    stores plain tensors only)."""
    for key, _ in _quantized_parameters(module, prefix):
        if key in state:
            weight = state.pop(key)
            for part in weight.__tensor_flatten__()[0]:
                state[f"{key}.{part}"] = getattr(weight, part)


def _unflatten_quantized(
    module: nn.Module, state: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """load_state_dict pre-hook: ``key.<part>`` tensors reassembled into the quantized weight ``key`` (the same
    subclass and attributes as the model's; ``copy_`` then checks they match). Parts left incomplete stay as they
    are, so a strict load reports them by key."""
    for key, param in _quantized_parameters(module, prefix):
        parts, attributes = param.__tensor_flatten__()
        if all(f"{key}.{part}" in state for part in parts):
            data = {part: state.pop(f"{key}.{part}") for part in parts}
            state[key] = type(param).__tensor_unflatten__(data, attributes, param.shape, param.stride())


def quantize_from_config(model: nn.Module, record: object, source: str) -> nn.Module:
    """Quantize a freshly built ``model`` as a saved folder's ``config.json`` ``"quantization"`` says (``source``
    names the file in errors), before its weights are loaded."""
    if not isinstance(record, Mapping) or record.get("mode") not in MODES:
        raise InvalidArgumentError("quantization", f"an object with 'mode' one of {list(MODES)}", record, f"{source}")
    return quantize(model, record["mode"], group_size=record.get("group_size"))
