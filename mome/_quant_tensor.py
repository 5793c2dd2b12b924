"""``GroupwiseIntTensor``: group-wise asymmetric int4 (two values a byte) or int8 weights, for CPU inference.

torchao 0.18 ships no packed int4 tensor that runs on CPU for any weight shape: ``Int4WeightOnlyConfig`` needs the
CUDA ``mslk`` kernels, ``IntxWeightOnlyConfig(weight_dtype=torch.int4)`` keeps one int4 value per int8 byte, and
the prototype ``Int4OpaqueTensor`` takes 2-D weights only and its CPU kernel is slow in fp32 (see
:mod:`mome._quantize`). :func:`mome.quantize` uses this subclass for every int4 weight (the stacked experts
``[E, out, in]``, ``nn.Linear`` and embeddings) and for the int8 embedding tables
(torchao's ``IntxUnpackedToInt8Tensor`` embedding dequantizes the whole table at each lookup, which made
LIMoE-tiny's forward ten times slower; here only the rows looked up are dequantized).

It is a torchao tensor subclass (``torchao.utils.TorchAOBaseTensor``: ``detach``/``clone``/``to``/``copy_`` come
from it), and its quantization is torchao's affine quantization (``quant_primitives``): per group of ``g`` values
along the last axis, with ``Q = 2^bits - 1``, ``scale = (max(w, 0) - min(w, 0)) / Q``,
``zero = clamp(-round(min(w, 0) / scale), 0, Q)``, ``q = clamp(round(w / scale) + zero, 0, Q)`` and
``w ≈ scale * (q - zero)``. What mome adds is the nibble packing of 4 bits (``q[2i]`` in the low four bits of byte
``i``, ``q[2i + 1]`` in the high four) and the ``linear``/``embedding`` ops, which dequantize (an embedding only
the rows it looks up) and call the float op.

Imported only when quantizing (it imports torchao).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchao.quantization.quant_primitives import (
    MappingType,
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
)
from torchao.utils import TorchAOBaseTensor

__all__ = ["GroupwiseIntTensor", "pack_int4", "unpack_int4"]

aten = torch.ops.aten
BITS = (4, 8)


def pack_int4(q: Tensor) -> Tensor:
    """``q [..., K]`` (uint8 values in ``[0, 15]``, ``K`` even) -> ``[..., K / 2]`` uint8: value ``2i`` in the low
    nibble of byte ``i``, value ``2i + 1`` in the high nibble."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of :func:`pack_int4`: ``[..., K / 2]`` uint8 -> ``[..., K]`` uint8."""
    pairs = torch.stack((packed & 0x0F, packed >> 4), dim=-1)  # [..., K/2, 2]
    return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)  # [..., K]


class GroupwiseIntTensor(TorchAOBaseTensor):
    """A float weight ``[..., K]`` stored as ``bits``-bit unsigned codes with a ``scale`` and a uint8 ``zero_point`` per
    group of ``block_size[-1]`` values along the last axis (both ``[..., K / g]``); ``w ≈ scale * (q - zero)``.
    ``qdata`` is ``[..., K / 2]`` uint8 for 4 bits (packed), ``[..., K]`` uint8 for 8 bits."""

    tensor_data_names = ["qdata", "scale", "zero_point"]
    tensor_attribute_names = ["block_size", "bits", "shape", "dtype"]

    def __new__(cls, qdata, scale, zero_point, block_size, bits, shape, dtype):
        kwargs = {"device": qdata.device, "dtype": dtype, "requires_grad": False}
        return torch.Tensor._make_wrapper_subclass(cls, shape, **kwargs)  # type: ignore[attr-defined]

    def __init__(self, qdata, scale, zero_point, block_size, bits, shape, dtype):
        super().__init__()
        self.qdata, self.scale, self.zero_point = qdata, scale, zero_point
        self.block_size, self.bits = list(block_size), bits

    def _quantization_type(self) -> str:
        return f"bits={self.bits}, shape={tuple(self.shape)}, block_size={self.block_size}, device={self.device}"

    @classmethod
    def from_hp(cls, weight: Tensor, group_size: int, bits: int = 4) -> GroupwiseIntTensor:
        """Quantize ``weight [..., K]`` (``K`` divisible by ``group_size``; even for 4 bits) group-wise."""
        block_size = [1] * (weight.ndim - 1) + [group_size]
        qmax = 2**bits - 1
        scale, zero_point = choose_qparams_affine(
            weight,
            MappingType.ASYMMETRIC,
            block_size,
            torch.uint8,
            quant_min=0,
            quant_max=qmax,
            eps=torch.finfo(torch.float32).eps,
            scale_dtype=weight.dtype,
            zero_point_dtype=torch.uint8,
        )  # each [..., K/g]
        q = quantize_affine(weight, block_size, scale, zero_point, torch.uint8, 0, qmax)  # [..., K]
        qdata = pack_int4(q) if bits == 4 else q
        return cls(qdata, scale, zero_point, block_size, bits, weight.shape, weight.dtype)

    def dequantize(self, output_dtype: torch.dtype | None = None) -> Tensor:
        """``scale * (q - zero)`` as a float tensor of the logical shape (torchao's ``dequantize_affine``)."""
        dtype = output_dtype or self.dtype
        return _dequantize(self.qdata, self.scale, self.zero_point, self.block_size, self.bits, dtype)


def _dequantize(
    qdata: Tensor, scale: Tensor, zero_point: Tensor, block_size: list[int], bits: int, dtype: torch.dtype
) -> Tensor:
    q = unpack_int4(qdata) if bits == 4 else qdata  # [..., K]
    block = block_size[len(block_size) - q.ndim :]  # rows gathered by an embedding keep the trailing block sizes
    return dequantize_affine(q, block, scale, zero_point, torch.uint8, 0, 2**bits - 1, output_dtype=dtype)


implements = GroupwiseIntTensor.implements
implements_torch_function = GroupwiseIntTensor.implements_torch_function


@implements(aten.linear.default)
@implements_torch_function(torch.nn.functional.linear)
def _(func, types, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return torch.nn.functional.linear(x, weight.dequantize(x.dtype), bias)


@implements(aten.embedding.default)
@implements_torch_function(torch.nn.functional.embedding)
def _(func, types, args, kwargs):
    indices, weight = args[0], args[1]
    max_norm = args[3] if len(args) > 3 else kwargs.get("max_norm")
    if max_norm is not None:  # F.embedding renormalises the looked-up rows of the table in place
        raise NotImplementedError("GroupwiseIntTensor: an embedding with max_norm writes to its table; not supported")
    flat = indices.reshape(-1)  # [N]
    rows = _dequantize(
        weight.qdata.index_select(0, flat),  # [N, K/2]
        weight.scale.index_select(0, flat),  # [N, K/g]
        weight.zero_point.index_select(0, flat),
        weight.block_size,
        weight.bits,
        weight.dtype,
    )  # [N, K]
    return rows.reshape(*indices.shape, weight.shape[-1])  # [..., K]


GroupwiseIntTensor.__module__ = "mome._quant_tensor"
torch.serialization.add_safe_globals([GroupwiseIntTensor])
