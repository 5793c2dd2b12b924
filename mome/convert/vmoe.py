"""Read ``google-research/vmoe`` checkpoints and convert V-MoE / Soft-MoE ViT parameters.

Reading (no JAX, no Flax: the ``msgpack`` package and numpy only). vmoe stores a params pytree in
its own sharded layout (``vmoe/checkpoints/partitioned.py``, ``serialization.py``; both the
``Version.V1 = "20220622"`` files and the older unversioned ones):

- ``<prefix>.index``: msgpack of ``{"shard_count": n, "index": tree, "version": ...}`` whose leaves
  are ``IndexInfo`` ext values (code 8): the leaf's global shape and dtype (a ``ShapedArray``, code
  4), the ``SliceNd`` (code 6, a tuple of ``Slice`` = ``(start, stop, step)``) of each chunk and
  the shard file holding it;
- ``<prefix>.data-nnnnn-of-NNNNN``: msgpack of ``{"__msgpack_array_chunk_a87ca2__": True,
  "<leaf id>": [[subchunks, SliceNd], ...]}`` where ``leaf id`` numbers the leaves in the order
  ``jax.tree_util`` flattens the index tree (dict keys sorted) and the flattened chunk is the
  concatenation of its ``subchunks`` (ndarrays, ext code 1: ``(shape, dtype name, C-order bytes)``).

A single Flax msgpack file (``flax.serialization.to_bytes(params)``, with Flax's
``__msgpack_chunked_array__`` leaves for huge arrays) and big_vision-style ``.npz`` files are read
too. The tree is flattened to ``"/"``-joined keys, e.g. ``Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel``.

Converting (Riquelme et al. 2021, arXiv:2106.05974; Puigcerver et al. 2023, arXiv:2308.00951) onto
:class:`~mome.models.MoEVisionTransformer` (timm names). Flax kernels are ``[in, out]``, torch
``nn.Linear`` weights ``[out, in]``:

=================================================  ============================================
vmoe                                               mome (timm ViT + MoE)
=================================================  ============================================
``embedding/kernel [kh, kw, C, D]``, ``bias``       ``patch_embed.proj.weight [D, C, kh, kw]``
``cls [1, 1, D]``                                   ``cls_token``
``Encoder/posembed_input/pos_embedding``            ``pos_embed`` (resampled if the grid differs)
``encoderblock_i/LayerNorm_{0,1}/{scale,bias}``     ``blocks.i.norm{1,2}.{weight,bias}``
``SelfAttention/{query,key,value}/kernel [D,h,d]``  ``attn.qkv.weight [3*h*d, D]`` (rows q, k, v)
``SelfAttention/{query,key,value}/bias [h, d]``     ``attn.qkv.bias [3*h*d]``
``SelfAttention/out/kernel [h, d, D]``, ``bias``    ``attn.proj.weight [D, h*d]``, ``bias``
``SelfAttention/{query,key}_ln/scale [d]``          ``attn.{q,k}_norm.weight`` (bias 0: Flax has none)
``Mlp/Dense_{0,1}/{kernel,bias}``                   ``mlp.fc{1,2}.{weight (transposed), bias}``
``Moe/Mlp/Dense_0/kernel [E, D, H]``, ``bias``      ``mlp.experts.w_in [E, H, D]``, ``b_in [E, H]``
``Moe/Mlp/Dense_1/kernel [E, H, D]``, ``bias``      ``mlp.experts.w_out [E, D, H]``, ``b_out [E, D]``
``Moe/Router/dense/kernel [D, E]``                  ``mlp.router.proj.weight [E, D]``
``Moe/Router/mu [D, E, P]``, ``scale []``           ``mlp.mu [D, E*P]`` (slot ``e*P + p``), ``mlp.scale``
``Encoder/encoder_norm/{scale,bias}``               ``norm`` (before pooling, as upstream)
``pre_logits/{kernel,bias}``                        ``pre_logits.fc.{weight (transposed), bias}``
``head/{kernel,bias}``                              ``head.{weight (transposed), bias}``
=================================================  ============================================

Which blocks hold an MoE, and whether it is sparse or soft, is read from the target model; a
checkpoint that disagrees shows up as upstream keys without a counterpart and model keys left
without a value. ``pre_logits`` (vmoe's ``representation_size``: a Dense + tanh between pooling and
head) needs a model built with ``representation_size`` of that width. vmoe normalises every token
(``encoder_norm``) before pooling; a model whose final norm follows pooling (timm's ``fc_norm``, the
default of ``global_pool="avg"``) computes another function and is refused: build it with
``fc_norm=False``. A full train state (``params/...``, ``opt_state/...``) converts its ``params``
subtree; the rest must be ignored explicitly (``ignore_prefixes=("opt_state/", ...)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._checkpoint import describe_checkpoint, file_kind, shard_prefix, starts_msgpack_map
from .._errors import CheckpointFormatError, CheckpointMismatchError, CorruptCheckpointError
from ..layers import MoE, SoftMoE
from ._keymap import KeyMap, resample_pos_embed

__all__ = ["convert_vmoe", "is_vmoe_checkpoint", "read_vmoe_checkpoint"]

_CHUNKS_MAGIC = "__msgpack_array_chunk_a87ca2__"  # vmoe's ArrayChunks (data shards)
_FLAX_CHUNKED = "__msgpack_chunked_array__"  # flax.serialization's chunked big arrays
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR, _EXT_SHAPED, _EXT_SLICE, _EXT_SLICE_ND, _EXT_SLICE_ND_ARRAY, _EXT_INDEX = (
    range(1, 9)
)

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


# ------------------------------------------------------------------------------------------- msgpack
def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError as err:  # pragma: no cover - msgpack ships with the dev environment
        raise ImportError("reading vmoe checkpoints needs the 'msgpack' package: pip install msgpack") from err
    return msgpack


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _torch_dtype(name: bytes | str) -> torch.dtype:
    name = _text(name)
    if name not in _TORCH_DTYPES:
        raise CorruptCheckpointError(f"vmoe checkpoint: unsupported dtype {name!r}")
    return _TORCH_DTYPES[name]


def _array_from_bytes(data: bytes) -> Tensor:
    """Flax's ndarray encoding: msgpack ``(shape, dtype name, C-order bytes)`` -> tensor."""
    shape, dtype_name, buffer = _msgpack().unpackb(data, raw=True)
    dtype = _torch_dtype(dtype_name)
    flat = torch.frombuffer(bytearray(buffer), dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
    return flat.reshape(tuple(shape))


@dataclass(frozen=True)
class _IndexInfo:
    """vmoe's ``IndexInfo``: a leaf's global shape/dtype, its chunks' slices and shard numbers."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    slices: tuple[tuple[tuple[int | None, int | None], ...], ...]
    shards: tuple[int, ...]


def _slice_from_bytes(data: bytes) -> tuple[int | None, int | None]:
    start, stop, step = _msgpack().unpackb(data, raw=True)
    if step not in (None, 1):
        raise CorruptCheckpointError(f"vmoe checkpoint: strided slice (step={step}) is not a vmoe chunk")
    return start, stop


def _slice_nd_from_bytes(data: bytes) -> tuple[tuple[int | None, int | None], ...]:
    return tuple(_slice_from_bytes(s) for s in _msgpack().unpackb(data, raw=True))


def _ext_hook(code: int, data: bytes) -> Any:
    """Decoders of the msgpack extension types of Flax and vmoe (``serialization._MsgpackExtType``)."""
    msgpack = _msgpack()
    if code == _EXT_NDARRAY:
        return _array_from_bytes(data)
    if code == _EXT_NPSCALAR:
        return _array_from_bytes(data).reshape(())
    if code == _EXT_SLICE:
        return _slice_from_bytes(data)
    if code == _EXT_SLICE_ND:
        return _slice_nd_from_bytes(data)
    if code == _EXT_SHAPED:
        shape, dtype_name, *_ = msgpack.unpackb(data, raw=True)  # (shape, dtype, weak_type, named_shape)
        return tuple(shape), _torch_dtype(dtype_name)
    if code == _EXT_INDEX:
        shaped, slices, shards = msgpack.unpackb(data, raw=True)
        shape, dtype = _ext_hook(_EXT_SHAPED, shaped)
        return _IndexInfo(shape, dtype, tuple(_slice_nd_from_bytes(s) for s in slices), tuple(shards))
    names = {_EXT_COMPLEX: "complex scalar", _EXT_SLICE_ND_ARRAY: "SliceNdArray"}
    raise CorruptCheckpointError(f"vmoe checkpoint: unexpected msgpack extension {code} ({names.get(code, 'unknown')})")


_NOT_VMOE = (
    "vmoe checkpoints are a <prefix>.index with its <prefix>.data-nnnnn-of-NNNNN shards, one Flax msgpack "
    "file, or a big_vision .npz"
)


def _starts_msgpack_map(path: Path) -> bool:
    """Whether ``path`` starts with a msgpack map whose first key is a string."""
    with open(path, "rb") as f:
        return starts_msgpack_map(f.read(6))


def _unpack_file(path: Path) -> Any:
    """The msgpack content of ``path``; a file of another kind or a broken one raises a typed error."""
    if not path.is_file():
        raise FileNotFoundError(f"vmoe checkpoint file {path} does not exist")
    if not _starts_msgpack_map(path):
        raise CheckpointFormatError(f"{path} is not a vmoe checkpoint: it is {describe_checkpoint(path)}; {_NOT_VMOE}")
    msgpack = _msgpack()
    try:
        return msgpack.unpackb(path.read_bytes(), ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except CorruptCheckpointError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as err:  # truncated or corrupted bytes
        raise CorruptCheckpointError(
            f"{path}: a msgpack file that cannot be decoded ({type(err).__name__}: {err})"
        ) from err


# ------------------------------------------------------------------------------------------- trees
def _unchunk_flax(node: Mapping[str, Any]) -> Tensor:
    """Flax's ``{"__msgpack_chunked_array__": True, "shape": {"0": ..}, "chunks": {"0": ..}}`` -> tensor."""
    shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
    chunks = [node["chunks"][str(i)].reshape(-1) for i in range(len(node["chunks"]))]
    return torch.cat(chunks).reshape(shape)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a/b/c": leaf}``, keys sorted at every level (``jax.tree_util``'s leaf order)."""
    if isinstance(tree, Mapping) and _FLAX_CHUNKED in tree:
        return {prefix.rstrip("/"): _unchunk_flax(tree)}
    if isinstance(tree, Mapping):
        flat: dict[str, Any] = {}
        for key in sorted(tree, key=str):
            flat.update(_flatten(tree[key], f"{prefix}{key}/"))
        return flat
    return {prefix.rstrip("/"): tree}


def _read_sharded(prefix: Path) -> dict[str, Tensor]:
    """Assemble every leaf of ``<prefix>.index`` from its chunks in the ``.data-*`` shards."""
    index = _unpack_file(Path(f"{prefix}.index"))
    if not isinstance(index, Mapping) or "index" not in index or "shard_count" not in index:
        raise CheckpointFormatError(f"{prefix}.index is not a vmoe checkpoint index (no 'index' / 'shard_count')")
    leaves = _flatten(index["index"])
    infos = list(leaves.values())
    if not all(isinstance(info, _IndexInfo) for info in infos):
        raise CorruptCheckpointError(f"{prefix}.index: leaves must be IndexInfo records")
    shard_count = int(index["shard_count"])
    buffers = [torch.zeros(info.shape, dtype=info.dtype) for info in infos]
    filled = [0] * len(infos)
    shards = sorted({shard for info in infos for shard in info.shards})
    for shard in shards:
        shard_path = Path(f"{prefix}.data-{shard:05d}-of-{shard_count:05d}")
        if not shard_path.is_file():
            raise CorruptCheckpointError(
                f"vmoe checkpoint {prefix}.index names shard {shard_path.name}, which is missing: fetch every "
                f"{prefix.name}.data-*-of-{shard_count:05d} file next to the index"
            )
        content = _unpack_file(shard_path)
        if not isinstance(content, Mapping) or not content.get(_CHUNKS_MAGIC):
            raise CheckpointFormatError(f"{shard_path} is not a vmoe data shard (no array-chunk marker)")
        for leaf_id, chunks in content.items():
            if leaf_id == _CHUNKS_MAGIC:
                continue
            leaf = int(leaf_id)
            if not 0 <= leaf < len(infos):
                raise CorruptCheckpointError(
                    f"{shard_path}: chunk for leaf {leaf}, but the index has {len(infos)} leaves"
                )
            buffer = buffers[leaf]
            for subchunks, slice_nd in chunks:
                region = tuple(
                    slice(start or 0, size if stop is None else stop)
                    for (start, stop), size in zip(slice_nd, buffer.shape)
                )
                shape = tuple(s.stop - s.start for s in region)
                chunk = torch.cat([c.reshape(-1) for c in subchunks]) if subchunks else buffer.new_empty(0)
                buffer[region] = chunk.reshape(shape).to(buffer.dtype)  # flat chunk -> its slice of the leaf
                filled[leaf] += chunk.numel()
    names = list(leaves)
    incomplete = [name for name, buffer, count in zip(names, buffers, filled) if count != buffer.numel()]
    if incomplete:
        raise CorruptCheckpointError(f"vmoe checkpoint {prefix}: shards do not cover leaves {incomplete[:20]}")
    return dict(zip(names, buffers))


def read_vmoe_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a vmoe checkpoint by ``"/"``-joined tree path (see the module docstring for the layouts).

    ``path``: a sharded checkpoint's prefix, ``.index`` file or any ``.data-*`` shard; a single Flax
    msgpack file; or an ``.npz`` (read with ``allow_pickle=False``).

    Raises:
        FileNotFoundError: ``path`` (or the index of a prefix) does not exist.
        CheckpointFormatError: a file of another kind (a torch pickle, safetensors, ...), said in the message.
        CorruptCheckpointError: a vmoe file that cannot be decoded, or a sharded checkpoint with a shard missing.
    """
    path = Path(path)
    prefix = shard_prefix(path)
    if prefix is not None:
        return _read_sharded(prefix)
    if path.is_file() and file_kind(path) == "npz":
        with np.load(path, allow_pickle=False) as arrays:
            return {key: torch.from_numpy(np.array(arrays[key])) for key in arrays.files}
    tree = _unpack_file(path)
    if not isinstance(tree, Mapping):
        raise CheckpointFormatError(
            f"{path}: expected a msgpack-serialised parameter tree, found {type(tree).__name__}"
        )
    if tree.get(_CHUNKS_MAGIC):
        raise CheckpointFormatError(f"{path} is a vmoe data shard without its .index next to it; {_NOT_VMOE}")
    flat = _flatten(tree)
    bad = [key for key, value in flat.items() if not isinstance(value, Tensor)]
    if bad:
        raise CheckpointFormatError(f"{path}: non-array leaves {bad[:20]} (not a vmoe parameter tree)")
    return flat


def is_vmoe_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is something :func:`read_vmoe_checkpoint` reads, told from bytes, not from the name alone.

    True for a sharded checkpoint's ``.index`` (a msgpack map with ``index`` and ``shard_count``), one of its
    ``.data-*`` shards or its prefix when the index is next to it, a Flax msgpack parameter tree, and an
    ``.npz`` of ``/``-joined big_vision/vmoe names. Reads at most the file's first map keys; never raises for
    a path that exists (False for torch or safetensors files, folders and anything else).
    """
    path = Path(path)
    prefix = shard_prefix(path)
    if prefix is not None:
        return _first_map_keys(Path(f"{prefix}.index")) >= {"index", "shard_count"}
    if not path.is_file():
        return False
    try:
        kind = file_kind(path)
        if kind == "npz":
            with np.load(path, allow_pickle=False) as arrays:
                return any("/" in key for key in arrays.files)
    except (OSError, ValueError):
        return False
    return bool(_first_map_keys(path))


def _first_map_keys(path: Path, limit: int = 64) -> set[str]:
    """The string keys of the msgpack map at the top of ``path`` (up to ``limit``), or an empty set."""
    if not path.is_file():
        return set()
    msgpack = _msgpack()
    try:
        if not _starts_msgpack_map(path):
            return set()
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, ext_hook=lambda code, data: None)
            keys = set()
            for _ in range(min(unpacker.read_map_header(), limit)):
                key = unpacker.unpack()
                if not isinstance(key, str):
                    return set()
                keys.add(key)
                unpacker.skip()
            return keys
    except (OSError, ValueError, msgpack.UnpackException):
        return set()


# ------------------------------------------------------------------------------------------- convert
def _kernel_t(kernel: Tensor) -> Tensor:
    """Flax Dense ``[in, out]`` -> ``nn.Linear`` ``[out, in]``."""
    return kernel.t()


def _expert_kernels_t(kernel: Tensor) -> Tensor:
    """Stacked Flax expert kernels ``[E, in, out]`` -> stacked ``nn.Linear`` layout ``[E, out, in]``."""
    return kernel.transpose(1, 2)


def _qkv_weight(kernels: list[Tensor]) -> Tensor:
    """``query/key/value`` kernels ``[D, h, d]`` -> timm's fused ``qkv.weight [3*h*d, D]``."""
    return torch.cat([k.reshape(k.shape[0], -1).t() for k in kernels])  # [D, h, d] -> [D, h*d] -> [h*d, D]


def _qkv_bias(biases: list[Tensor]) -> Tensor:
    return torch.cat([b.reshape(-1) for b in biases])  # [h, d] -> [h*d], then q, k, v


def _out_weight(kernel: Tensor) -> Tensor:
    """``out`` kernel ``[h, d, D]`` -> ``proj.weight [D, h*d]``."""
    return kernel.reshape(-1, kernel.shape[-1]).t()


def _layer_norm(km: KeyMap, dst: str, src: str) -> None:
    km.copy(f"{dst}.weight", f"{src}/scale")
    km.copy(f"{dst}.bias", f"{src}/bias")


def _attention(km: KeyMap, dst: str, src: str) -> None:
    projections = [f"{src}/{name}" for name in ("query", "key", "value")]
    km.merge(f"{dst}.qkv.weight", [f"{p}/kernel" for p in projections], _qkv_weight)
    if f"{dst}.qkv.bias" in km.target:
        km.merge(f"{dst}.qkv.bias", [f"{p}/bias" for p in projections], _qkv_bias)
    km.copy(f"{dst}.proj.weight", f"{src}/out/kernel", _out_weight)
    if f"{dst}.proj.bias" in km.target:
        km.copy(f"{dst}.proj.bias", f"{src}/out/bias")
    for ours, theirs in (("q_norm", "query_ln"), ("k_norm", "key_ln")):  # QK-norm (ViT-22B, Soft MoE configs)
        if f"{dst}.{ours}.weight" in km.target:
            km.copy(f"{dst}.{ours}.weight", f"{src}/{theirs}/scale")
            if f"{dst}.{ours}.bias" in km.target:  # Flax's query_ln/key_ln have no bias
                km.put(f"{dst}.{ours}.bias", torch.zeros_like(km.target[f"{dst}.{ours}.bias"]))


def _experts(km: KeyMap, dst: str, src: str) -> None:
    for index, (weight, bias) in enumerate((("w_in", "b_in"), ("w_out", "b_out"))):
        km.copy(f"{dst}.{weight}", f"{src}/Dense_{index}/kernel", _expert_kernels_t)
        if f"{dst}.{bias}" in km.target:
            km.copy(f"{dst}.{bias}", f"{src}/Dense_{index}/bias")


def _ffn(km: KeyMap, mlp: nn.Module, dst: str, src: str) -> None:
    if isinstance(mlp, SoftMoE):
        km.copy(f"{dst}.mu", f"{src}/Moe/Router/mu", lambda mu: mu.flatten(1))  # [D, E, P] -> [D, E*P]
        km.copy(f"{dst}.scale", f"{src}/Moe/Router/scale", lambda s: s.reshape(()))
        _experts(km, f"{dst}.experts", f"{src}/Moe/Mlp")
    elif isinstance(mlp, MoE):
        km.copy(f"{dst}.router.proj.weight", f"{src}/Moe/Router/dense/kernel", _kernel_t)
        if f"{dst}.router.proj.bias" in km.target:
            km.copy(f"{dst}.router.proj.bias", f"{src}/Moe/Router/dense/bias")
        _experts(km, f"{dst}.experts", f"{src}/Moe/Mlp")
    else:
        for index in (0, 1):
            km.copy(f"{dst}.fc{index + 1}.weight", f"{src}/Mlp/Dense_{index}/kernel", _kernel_t)
            km.copy(f"{dst}.fc{index + 1}.bias", f"{src}/Mlp/Dense_{index}/bias")


def convert_vmoe(
    state: Mapping[str, Tensor], model: nn.Module, *, ignore_prefixes: Iterable[str] = ()
) -> dict[str, Tensor]:
    """vmoe params (``"/"``-joined keys) -> ``model``'s state dict (see the module docstring's table).

    ``model`` is a :class:`~mome.models.MoEVisionTransformer` (V-MoE or Soft-MoE ViT); it is read
    for its configuration only. Raises :class:`~mome.CheckpointMismatchError` listing every
    upstream key without a counterpart (unless under ``ignore_prefixes``), every needed key the
    checkpoint lacks and every shape that disagrees.
    """
    root = "params/" if not any(k.startswith("Encoder/") for k in state) and "params/embedding/kernel" in state else ""
    km = KeyMap(state, model.state_dict(), "vmoe checkpoint", ignore_prefixes)
    km.copy("patch_embed.proj.weight", f"{root}embedding/kernel", lambda k: k.permute(3, 2, 0, 1))  # HWIO -> OIHW
    km.copy("patch_embed.proj.bias", f"{root}embedding/bias")
    if "cls_token" in km.target:
        km.copy("cls_token", f"{root}cls")
    if "pos_embed" in km.target:
        prefix_tokens = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        km.copy(
            "pos_embed",
            f"{root}Encoder/posembed_input/pos_embedding",
            lambda p: resample_pos_embed(p, km.target["pos_embed"].shape, model.patch_embed.grid_size, prefix_tokens),
        )
    for i, block in enumerate(model.blocks):
        src, dst = f"{root}Encoder/encoderblock_{i}", f"blocks.{i}"
        _layer_norm(km, f"{dst}.norm1", f"{src}/LayerNorm_0")
        _layer_norm(km, f"{dst}.norm2", f"{src}/LayerNorm_1")
        _attention(km, f"{dst}.attn", f"{src}/SelfAttention")
        _ffn(km, block.mlp, f"{dst}.mlp", src)
    if "fc_norm.weight" in km.target:
        raise CheckpointMismatchError(
            f"vmoe checkpoint: upstream applies {root}Encoder/encoder_norm to every token before pooling, but this "
            "model's final norm is timm's fc_norm after pooling (the default for global_pool='avg'), a different "
            "function; build the model with fc_norm=False"
        )
    if "norm.weight" in km.target:
        _layer_norm(km, "norm", f"{root}Encoder/encoder_norm")
    if "pre_logits.fc.weight" in km.target:
        km.copy("pre_logits.fc.weight", f"{root}pre_logits/kernel", _kernel_t)
        km.copy("pre_logits.fc.bias", f"{root}pre_logits/bias")
    elif f"{root}pre_logits/kernel" in km.source:
        km.error(
            f"the checkpoint has a pre_logits layer ({root}pre_logits/kernel: vmoe's representation_size="
            f"{km.source[f'{root}pre_logits/kernel'].shape[-1]}) but the model has none: build it with "
            "representation_size=<that width>"
        )
        km.consume(f"{root}pre_logits/kernel")
        km.consume(f"{root}pre_logits/bias")
    if "head.weight" in km.target:
        km.copy("head.weight", f"{root}head/kernel", _kernel_t)
        km.copy("head.bias", f"{root}head/bias")
    return km.finish()
