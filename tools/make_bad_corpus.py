"""Write the corpus of bad inputs under ``tests/data/bad/`` (``tests/test_reliability.py`` feeds it to mome).

Every file is generated from code here, deterministically (fixed seeds, no compressed image formats, no time
stamps), so the test can regenerate the corpus into a temporary folder and check that it equals the committed
one byte for byte: the script and the data cannot drift apart. The corpus is small (well under 1 MB).

Layout (``manifest.json`` lists every entry with the error a user should get and the text it must name)::

    checkpoints/   truncated, bit-flipped, empty and garbage safetensors; pickles whose ``__reduce__`` would
                   create a marker file; checkpoints of another architecture, of wrong shapes and dtypes
    cards/         zoo cards with missing, mistyped or out-of-range fields, unknown fields, bad YAML
    overrides.json mome-train Hydra overrides with wrong types, unknown keys and impossible values
    calls.json     library calls: model and layer constructors with bad arguments, forwards with bad inputs
    images/        an ImageFolder tree (PPM images) with files that are not images
    captions/      open_clip-style TSV files: an empty and a huge caption, a non-image, a missing column
    conversations/ LLaVA JSON with missing turns, wrong roles, missing images, invalid JSON

Usage::

    python tools/make_bad_corpus.py [OUT_DIR]     # default: tests/data/bad
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pathlib
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The registered architecture the checkpoints and cards are made for (``tests/test_reliability.py`` registers it).
ARCH = "_reliability_tiny_moe"
#: File the pickled payloads would create (relative to the working directory of the process that unpickles).
MARKER = "MOME_PWNED_MARKER"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "bad"


def tiny_model(num_experts: int = 4) -> nn.Module:
    """The architecture the corpus targets: a linear stem, one sparse MoE layer (mome's own), a linear head."""
    from mome.layers import SparseMoE

    return nn.Sequential(nn.Linear(4, 8), SparseMoE(8, 16, num_experts, top_k=2), nn.Linear(8, 3))


def reference_state(num_experts: int = 4) -> dict[str, torch.Tensor]:
    """The weights of ``tiny_model`` with seed 0 (the "good" checkpoint the bad ones are derived from)."""
    torch.manual_seed(0)
    return {k: v.detach().clone().contiguous() for k, v in tiny_model(num_experts).state_dict().items()}


class Payload:
    """Unpickling this calls ``Path.touch(MARKER)``: a harmless stand-in for ``os.system``."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(MARKER),))


def _safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(state, metadata={"format": "pt"})


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _flip(blob: bytes, position: int, bit: int = 0) -> bytes:
    data = bytearray(blob)
    data[position] ^= 1 << bit
    return bytes(data)


def _random_bytes(size: int) -> bytes:
    """``size`` bytes of a fixed pseudo-random stream (the same on every run and platform)."""
    return (
        torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(7)).numpy().tobytes()
    )


def _checkpoints(out: Path, entries: list[dict[str, Any]]) -> None:
    good = reference_state()
    blob = _safetensors_bytes(good)
    header = int.from_bytes(blob[:8], "little")  # safetensors: u64 header length, JSON header, then data
    files: dict[str, tuple[bytes, str, str]] = {
        # name: (content, expected error, text the message must contain)
        "good.safetensors": (blob, "", ""),
        "empty.safetensors": (b"", "CorruptCheckpointError", "empty.safetensors"),
        "truncated_header.safetensors": (blob[:20], "CorruptCheckpointError", "truncated_header.safetensors"),
        "truncated_data.safetensors": (blob[: len(blob) - 37], "CorruptCheckpointError", "truncated_data"),
        "bitflip_length.safetensors": (_flip(blob, 5, 3), "CorruptCheckpointError", "bitflip_length"),
        "bitflip_header.safetensors": (_flip(blob, 8, 5), "CorruptCheckpointError", "bitflip_header"),
        # a flipped bit in tensor data is undetectable by the format: the card's sha256 catches it
        "bitflip_data.safetensors": (_flip(blob, 8 + header + 17, 6), "ChecksumMismatchError", "bitflip_data"),
        "text.safetensors": (b"this is not a checkpoint\n" * 4, "CorruptCheckpointError", "text.safetensors"),
        "evil.pt": (_torch_bytes({"state_dict": {**good, "0.weight": Payload()}}), "UnsafeCheckpointError", "evil.pt"),
        "evil.bin": (_torch_bytes(Payload()), "UnsafeCheckpointError", "evil.bin"),
        "evil_nested.pth": (
            _torch_bytes({"model": {**good, "extra": [1, {"x": Payload()}]}}),
            "UnsafeCheckpointError",
            "evil_nested.pth",
        ),
        "truncated.pt": (_torch_bytes(good)[:300], "CorruptCheckpointError", "truncated.pt"),
        "not_a_dict.pt": (_torch_bytes([good["0.weight"]]), "CorruptCheckpointError", "list"),
        # a Lightning checkpoint of another model: create_model, mome-train ckpt_path= and mome-eval refuse it
        "other_task.ckpt": (
            _torch_bytes(
                {
                    "epoch": 0,
                    "global_step": 10,
                    "state_dict": {"model.patch_embed.proj.weight": torch.zeros(2, 3)},
                    "hyper_parameters": {"model": {"model_name": ARCH}},
                }
            ),
            "CheckpointMismatchError",
            "missing",
        ),
        "non_tensor_entry.pt": (_torch_bytes({**good, "note": "hello"}), "CorruptCheckpointError", "note"),
        "other_arch.safetensors": (
            _safetensors_bytes({k: v for k, v in good.items() if not k.startswith("1.")}),
            "CheckpointMismatchError",
            "missing",
        ),
        "more_experts.safetensors": (
            _safetensors_bytes(reference_state(num_experts=8)),
            "CheckpointMismatchError",
            "1.router.proj.weight",
        ),
        "extra_key.safetensors": (
            _safetensors_bytes({**good, "2.scale": torch.ones(3)}),
            "CheckpointMismatchError",
            "2.scale",
        ),
        "transposed.safetensors": (
            _safetensors_bytes({**good, "0.weight": good["0.weight"].t().contiguous()}),
            "CheckpointMismatchError",
            "0.weight",
        ),
        "wrong_dtype_int.safetensors": (
            _safetensors_bytes({k: (v * 100).to(torch.int64) for k, v in good.items()}),
            "CheckpointMismatchError",
            "dtype",
        ),
        # bytes of no format at all are corrupt, not unsafe, whatever the suffix says
        "random_bytes.pt": (_random_bytes(4096), "CheckpointFormatError", "random_bytes.pt"),
        "random_bytes.ckpt": (_random_bytes(4096), "CheckpointFormatError", "random_bytes.ckpt"),
        # weights of the right names and shapes holding NaN or Inf: refused unless allow_non_finite=True
        "nan.safetensors": (
            _safetensors_bytes({**good, "0.weight": torch.full_like(good["0.weight"], float("nan"))}),
            "NonFiniteWeightsError",
            "0.weight",
        ),
        "inf.safetensors": (
            _safetensors_bytes({**good, "2.bias": torch.full_like(good["2.bias"], float("inf"))}),
            "NonFiniteWeightsError",
            "2.bias",
        ),
        # half precision is a precision change, not a mismatch: it loads, cast to the model's dtype
        "half_precision.safetensors": (_safetensors_bytes({k: v.half() for k, v in good.items()}), "", ""),
    }
    folder = out / "checkpoints"
    folder.mkdir(parents=True)
    for name, (content, error, match) in files.items():
        (folder / name).write_bytes(content)
        entry = {"kind": "checkpoint", "file": f"checkpoints/{name}", "error": error, "match": match}
        if name == "bitflip_data.safetensors":
            entry["sha256"] = hashlib.sha256(blob).hexdigest()  # the card's (intact) checksum
        entries.append(entry)


def _card(**changes: Any) -> dict[str, Any]:
    card: dict[str, Any] = {
        "architecture": ARCH,
        "tag": "t",
        "file": "weights.safetensors",
        "source_format": "mome",
        "input_size": [3, 32, 32],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "license": "apache-2.0",
    }
    for key, value in changes.items():
        if value is _DROP:
            card.pop(key)
        else:
            card[key] = value
    return card


_DROP = object()


def _cards(out: Path, entries: list[dict[str, Any]]) -> None:
    import yaml

    folder = out / "cards"
    folder.mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(_safetensors_bytes(reference_state()))
    cards: dict[str, tuple[Any, str | None, str]] = {
        # tag: (card or raw YAML text, the field the error names, text the message must contain)
        "missing_license": (_card(license=_DROP), "license", "is required"),
        "missing_input_size": (_card(input_size=_DROP), "input_size", "is required"),
        "string_input_size": (_card(input_size="224"), "input_size", "must be list"),
        "two_channel_mean": (_card(mean=[0.5, 0.5]), "mean", "list of 3 numbers"),
        "bool_crop": (_card(crop_pct=True), "crop_pct", "must be int/float"),
        "crop_above_one": (_card(crop_pct=1.5), "crop_pct", "(0, 1]"),
        "unknown_interpolation": (_card(interpolation="cubic"), "interpolation", "must be one of"),
        "unknown_format": (_card(source_format="pickle"), "source_format", "must be one of"),
        "short_sha256": (_card(sha256="abc123"), "sha256", "64 lower-case hex"),
        "upper_sha256": (_card(sha256="A" * 64), "sha256", "64 lower-case hex"),
        "unknown_field": (_card(weights_url="https://example.org/w.bin"), "weights_url", "unknown field"),
        "no_weight_source": (_card(file=_DROP), "hf_hub_id", "no weight source"),
        "missing_file": (_card(file="absent.safetensors"), "file", "does not exist"),
        "bad_url": (_card(file=_DROP, url="ftp://example.org/w.bin"), "url", "http(s) URL"),
        "bad_hub_id": (_card(file=_DROP, hf_hub_id="not a repo"), "hf_hub_id", "repo id"),
        "filename_without_hub": (_card(hf_hub_filename="w.safetensors"), "hf_hub_filename", "needs hf_hub_id"),
        "foreign_without_converter": (_card(source_format="vmoe"), "converter", "format needs one of"),
        "native_with_converter": (_card(converter="vmoe"), "converter", "needs no converter"),
        "string_default": (_card(default="yes"), "default", "must be bool"),
        "bad_results": (_card(results={"imagenet": {"top1": "high"}}), "results", "must be named by strings"),
        "bad_model_kwargs": (_card(model_kwargs={"not-a-name": 1}), "model_kwargs", "keyword names"),
        "wrong_name": (_card(tag="other"), None, "named after its arch.tag"),
        "a_list": ("- architecture: x\n- tag: y\n", None, "YAML mapping"),
        "invalid_yaml": ("architecture: [unclosed\ntag: t\n", None, "not valid YAML"),
        "python_tag": (
            f"architecture: {ARCH}\ntag: python_tag\nnotes: !!python/object/apply:pathlib.Path.touch "
            f"[!!python/object/apply:pathlib.Path ['{MARKER}']]\n",
            None,
            "not valid YAML",
        ),
    }
    for tag, (card, field, match) in cards.items():
        name = f"{ARCH}.{tag}.yaml"
        if isinstance(card, dict):
            card = dict(card)
            card["tag"] = card["tag"] if tag == "wrong_name" else tag
            text = yaml.safe_dump(card, sort_keys=False)
        else:
            text = card
        (folder / name).write_text(text)
        entries.append({"kind": "card", "file": f"cards/{name}", "error": "CardError", "field": field, "match": match})


#: mome-train overrides that must stop the run before training (``stage``: where the error is raised).
OVERRIDES: list[dict[str, Any]] = [
    {"overrides": ["data.batch_size=abc"], "stage": "run", "match": "batch_size"},
    {"overrides": ["data.batch_size=0"], "stage": "run", "match": "batch_size"},
    {"overrides": ["data.task=segmentation"], "stage": "run", "match": "data.task"},
    {"overrides": ["model.num_experts=two"], "stage": "run", "match": "num_experts"},
    {"overrides": ["model.top_k=0"], "stage": "run", "match": "top_k"},
    {"overrides": ["model.model_name=vmoe_tiny_patch8_e4.nonexistent"], "stage": "run", "match": "nonexistent"},
    {"overrides": ["+model.no_such_kwarg=1"], "stage": "run", "match": "no_such_kwarg"},
    {"overrides": ["ckpt_path=/nonexistent/last.ckpt"], "stage": "run", "match": "ckpt_path"},
    # resuming from a damaged file, a pickle that would run code, another model's checkpoint ({corpus}: this folder)
    {"overrides": ["ckpt_path={corpus}/checkpoints/truncated.pt"], "stage": "run", "match": "truncated.pt"},
    {"overrides": ["ckpt_path={corpus}/checkpoints/evil.pt"], "stage": "run", "match": "evil.pt"},
    {"overrides": ["ckpt_path={corpus}/checkpoints/other_task.ckpt"], "stage": "run", "match": "missing"},
    {
        "overrides": ["optimized_metric=val/never_logged", "trainer.max_steps=1"],
        "stage": "end",
        "match": "never_logged",
    },
    # numbers of the wrong type or out of range, given as a new user types them
    {"overrides": ["trainer.max_epochs=abc"], "stage": "run", "match": "trainer.max_epochs"},
    {"overrides": ["trainer.max_steps=-5"], "stage": "run", "match": "trainer.max_steps"},
    {"overrides": ["data.num_workers=-1"], "stage": "run", "match": "data.num_workers"},
    {"overrides": ["data.batch_size=-1"], "stage": "run", "match": "batch_size"},
    {"overrides": ["task.optimizer.lr=nan"], "stage": "run", "match": "lr"},
    {"overrides": ["task.optimizer.lr=inf"], "stage": "run", "match": "lr"},
    {"overrides": ["task.optimizer.lr=-1"], "stage": "run", "match": "lr"},
    {"overrides": ["seed=abc"], "stage": "run", "match": "seed"},
    {"overrides": ["seed=1.5"], "stage": "run", "match": "seed"},
    {"overrides": ["model.num_experts=-2"], "stage": "run", "match": "num_experts"},
    {"overrides": ["+model.img_size=30"], "stage": "run", "match": "img_size"},
    {
        "overrides": ["experiment=vmoe_digits", "+model.moe_kwargs.capacity_factor=inf"],
        "stage": "run",
        "match": "capacity_factor",
    },
    {"overrides": ["experiment=softmoe_digits", "+model.top_k=3"], "stage": "run", "match": "top_k"},
    {"overrides": ["data.no_such_key=1"], "stage": "compose", "match": "no_such_key"},
    {"overrides": ["trainer.max_epochs=[1"], "stage": "compose", "match": "[1"},
    {"overrides": ["experiment=no_such_experiment"], "stage": "compose", "match": "no_such_experiment"},
]


#: Library calls with bad arguments or inputs: ``construct`` builds ``model`` (a registry name, through
#: ``create_model``) or ``layer`` (a class of ``mome.layers``) with ``kwargs``; ``forward`` then calls ``method``
#: with ``inputs`` (each a tensor of ``shape`` and ``dtype``, filled with ``value``, or random normal when absent).
#: ``error`` is the ``mome`` error class expected, and ``match`` a text its message names; an empty ``error``
#: means the call must succeed with a finite output of ``shape`` (an empty batch is an input, not an error).
_IMAGE = {"shape": [2, 3, 32, 32], "dtype": "float32"}
_OOV = {"shape": [2, 8], "dtype": "int64", "value": 1_000_000}  # beyond every vocabulary of the zoo
CALLS: list[dict[str, Any]] = [
    # model constructors: geometry, sizes, capacity, options the family does not use
    {"model": "vmoe_tiny_patch8_e4", "kwargs": {"img_size": 30}, "error": "InvalidArgumentError", "match": "img_size"},
    {
        "model": "vmoe_tiny_patch8_e4",
        "kwargs": {"num_classes": -1},
        "error": "InvalidArgumentError",
        "match": "num_classes",
    },
    {
        "model": "vmoe_tiny_patch8_e4",
        "kwargs": {"num_experts": 0},
        "error": "InvalidArgumentError",
        "match": "num_experts",
    },
    {"model": "vmoe_tiny_patch8_e4", "kwargs": {"top_k": 5}, "error": "InvalidArgumentError", "match": "top_k"},
    {"model": "vmoe_tiny_patch8_e4", "kwargs": {"depth": 0}, "error": "InvalidArgumentError", "match": "depth"},
    {"model": "vmoe_tiny_patch8_e4", "kwargs": {"num_heads": 5}, "error": "InvalidArgumentError", "match": "num_heads"},
    {
        "model": "vmoe_tiny_patch8_e4",
        "kwargs": {"moe_kwargs": {"capacity_factor": float("inf")}},
        "error": "InvalidArgumentError",
        "match": "capacity_factor",
    },
    {
        "model": "vmoe_tiny_patch8_e4",
        "kwargs": {"moe_kwargs": {"capacity_factor": float("nan")}},
        "error": "InvalidArgumentError",
        "match": "capacity_factor",
    },
    {  # the MoE layers' options go in moe_kwargs: a top-level one is refused by name, not dropped
        "model": "vmoe_tiny_patch8_e4",
        "kwargs": {"capacity_factor": 1.0},
        "error": "UnsupportedOptionError",
        "match": "capacity_factor",
    },
    {
        "model": "limoe_tiny_patch8_e4",
        "kwargs": {"num_classes": 3},
        "error": "UnsupportedOptionError",
        "match": "num_classes",
    },
    {
        "model": "soft_moe_vit_tiny_patch8_e8",
        "kwargs": {"top_k": 3},
        "error": "UnsupportedOptionError",
        "match": "top_k",
    },
    {
        "model": "soft_moe_vit_tiny_patch8_e8",
        "kwargs": {"img_size": 36},
        "error": "InvalidArgumentError",
        "match": "img_size",
    },
    {
        "model": "soft_moe_vit_tiny_patch8_e8",
        "kwargs": {"num_experts": -8},
        "error": "InvalidArgumentError",
        "match": "num_experts",
    },
    {"model": "limoe_tiny_patch8_e4", "kwargs": {"img_size": 30}, "error": "InvalidArgumentError", "match": "img_size"},
    {
        "model": "limoe_tiny_patch8_e4",
        "kwargs": {"num_experts": 0},
        "error": "InvalidArgumentError",
        "match": "num_experts",
    },
    {
        "model": "limoe_tiny_patch8_e4",
        "kwargs": {"context_length": 0},
        "error": "InvalidArgumentError",
        "match": "context_length",
    },
    {"model": "vlmo_tiny_patch8_32", "kwargs": {"img_size": 30}, "error": "InvalidArgumentError", "match": "img_size"},
    {"model": "vlmo_tiny_patch8_32", "kwargs": {"depth": -1}, "error": "InvalidArgumentError", "match": "depth"},
    {
        "model": "moe_llava_tiny_e4",
        "kwargs": {"num_experts": 0},
        "error": "InvalidArgumentError",
        "match": "num_experts",
    },
    {"model": "moe_llava_tiny_e4", "kwargs": {"top_k": 9}, "error": "InvalidArgumentError", "match": "top_k"},
    # model forward inputs: rank, channels, size, dtype, token ids beyond the vocabulary
    {
        "model": "vmoe_tiny_patch8_e4",
        "method": "forward",
        "inputs": {"x": {"shape": [3, 32, 32], "dtype": "float32"}},
        "error": "InvalidInputError",
        "match": "x",
    },
    {
        "model": "vmoe_tiny_patch8_e4",
        "method": "forward",
        "inputs": {"x": {"shape": [2, 1, 32, 32], "dtype": "float32"}},
        "error": "InvalidInputError",
        "match": "x",
    },
    {
        "model": "vmoe_tiny_patch8_e4",
        "method": "forward",
        "inputs": {"x": {"shape": [2, 3, 40, 40], "dtype": "float32"}},
        "error": "InvalidInputError",
        "match": "x",
    },
    {
        "model": "vmoe_tiny_patch8_e4",
        "method": "forward",
        "inputs": {"x": {"shape": [2, 3, 32, 32], "dtype": "int64", "value": 1}},
        "error": "InvalidInputError",
        "match": "x",
    },
    {
        "model": "soft_moe_vit_tiny_patch8_e8",
        "method": "forward",
        "inputs": {"x": {"shape": [0, 3, 32, 32], "dtype": "float32"}},
        "error": "",
        "shape": [0, 10],
    },
    {
        "model": "soft_moe_vit_tiny_patch8_e8",
        "method": "forward",
        "inputs": {"x": {"shape": [3, 32, 32], "dtype": "float32"}},
        "error": "InvalidInputError",
        "match": "x",
    },
    {
        "model": "limoe_tiny_patch8_e4",
        "method": "encode_image",
        "inputs": {"image": {"shape": [3, 32, 32], "dtype": "float32"}},
        "error": "InvalidInputError",
        "match": "image",
    },
    {
        "model": "limoe_tiny_patch8_e4",
        "method": "encode_text",
        "inputs": {"text": _OOV},
        "error": "InvalidInputError",
        "match": "text",
    },
    {
        "model": "vlmo_tiny_patch8_32",
        "method": "encode_image",
        "inputs": {"image": {"shape": [2, 3, 64, 64], "dtype": "float32"}},
        "error": "InvalidInputError",
        "match": "image",
    },
    {
        "model": "vlmo_tiny_patch8_32",
        "method": "encode_text",
        "inputs": {"text": _OOV},
        "error": "InvalidInputError",
        "match": "text",
    },
    {
        "model": "moe_llava_tiny_e4",
        "method": "forward",
        "inputs": {"input_ids": _OOV},
        "error": "InvalidInputError",
        "match": "input_ids",
    },
    {
        "model": "moe_llava_tiny_e4",
        "method": "forward",
        "inputs": {
            "input_ids": {"shape": [2, 8], "dtype": "int64", "value": 1},
            "pixel_values": {"shape": [3, 32, 32], "dtype": "float32"},
        },
        "error": "InvalidInputError",
        "match": "pixel_values",
    },
    # layers: sizes, capacity, noise, and inputs
    {
        "layer": "SparseMoE",
        "kwargs": {"dim": 8, "hidden_dim": 16, "num_experts": 0},
        "error": "InvalidArgumentError",
        "match": "num_experts",
    },
    {
        "layer": "SparseMoE",
        "kwargs": {"dim": 8, "hidden_dim": 16, "num_experts": 4, "top_k": 0},
        "error": "InvalidArgumentError",
        "match": "top_k",
    },
    {
        "layer": "SparseMoE",
        "kwargs": {"dim": 8, "hidden_dim": 16, "num_experts": 4, "top_k": True},
        "error": "InvalidArgumentError",
        "match": "top_k",
    },
    {
        "layer": "SparseMoE",
        "kwargs": {"dim": 8, "hidden_dim": 16, "num_experts": 4, "capacity_factor": float("inf")},
        "error": "InvalidArgumentError",
        "match": "capacity_factor",
    },
    {
        "layer": "SparseMoE",
        "kwargs": {"dim": 8, "hidden_dim": 16, "num_experts": 4, "capacity_factor": float("nan")},
        "error": "InvalidArgumentError",
        "match": "capacity_factor",
    },
    {
        "layer": "SparseMoE",
        "kwargs": {"dim": 8, "hidden_dim": 16, "num_experts": 4, "noise_std": -1.0},
        "error": "InvalidArgumentError",
        "match": "noise_std",
    },
    {
        "layer": "SparseMoE",
        "kwargs": {"dim": 0, "hidden_dim": 16, "num_experts": 4},
        "error": "InvalidArgumentError",
        "match": "dim",
    },
    {
        "layer": "SoftMoE",
        "kwargs": {"dim": 8, "hidden_dim": 16, "num_experts": 4, "slots_per_expert": 0},
        "error": "InvalidArgumentError",
        "match": "slots_per_expert",
    },
    {
        "layer": "SparseMoE",
        "kwargs": {"dim": 8, "hidden_dim": 16, "num_experts": 4},
        "method": "forward",
        "inputs": {"x": {"shape": [2, 5, 7], "dtype": "float32"}},
        "error": "InvalidInputError",
        "match": "x",
    },
    {
        "layer": "SparseMoE",
        "kwargs": {"dim": 8, "hidden_dim": 16, "num_experts": 4},
        "method": "forward",
        "inputs": {"x": {"shape": [2, 5, 8], "dtype": "int64", "value": 1}},
        "error": "InvalidInputError",
        "match": "x",
    },
    {
        "layer": "SparseMoE",
        "kwargs": {"dim": 8, "hidden_dim": 16, "num_experts": 4},
        "method": "forward",
        "inputs": {
            "x": {"shape": [2, 5, 8], "dtype": "float32"},
            "modality_ids": {"shape": [2, 5], "dtype": "int64", "value": 5},
        },
        "error": "InvalidInputError",
        "match": "modality_ids",
    },
    {
        "layer": "SoftMoE",
        "kwargs": {"dim": 8, "hidden_dim": 16, "num_experts": 4},
        "method": "forward",
        "inputs": {"x": {"shape": [0, 5, 8], "dtype": "float32"}},
        "error": "",
        "shape": [0, 5, 8],
    },
    {
        "layer": "SoftMoE",
        "kwargs": {"dim": 8, "hidden_dim": 16, "num_experts": 4},
        "method": "forward",
        "inputs": {"x": {"shape": [2, 0, 8], "dtype": "float32"}},
        "error": "",
        "shape": [2, 0, 8],
    },
    {
        "layer": "MultiwayFFN",
        "kwargs": {"dim": 8, "hidden_dim": 16},
        "method": "forward",
        "inputs": {
            "x": {"shape": [2, 5, 8], "dtype": "float32"},
            "modality_ids": {"shape": [2, 5], "dtype": "int64", "value": 5},
        },
        "error": "InvalidInputError",
        "match": "modality_ids",
    },
    {
        "layer": "ExpertChoiceRouter",
        "kwargs": {"dim": 8, "num_experts": 4, "capacity_factor": 0.0},
        "error": "InvalidArgumentError",
        "match": "capacity_factor",
    },
    {  # a top-k router's option given to another router is refused, not ignored
        "layer": "SparseMoE",
        "kwargs": {"dim": 8, "hidden_dim": 16, "num_experts": 4, "router": "hash", "batch_priority": True},
        "error": "UnsupportedOptionError",
        "match": "batch_priority",
    },
    {
        "model": "vmoe_tiny_patch8_e4",
        "kwargs": {"router": "expert_choice", "moe_kwargs": {"noise_std": 0.5}},
        "error": "UnsupportedOptionError",
        "match": "noise_std",
    },
    {
        "layer": "HashRouter",
        "kwargs": {"num_experts": 4, "num_buckets": 0},
        "error": "InvalidArgumentError",
        "match": "num_buckets",
    },
]


def _ppm(seed: int, size: int = 8) -> bytes:
    """An uncompressed binary PPM image (byte-exact on every platform, unlike PNG's zlib output)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    return f"P6\n{size} {size}\n255\n".encode() + pixels.numpy().tobytes()


def _images(out: Path, entries: list[dict[str, Any]]) -> None:
    root = out / "images" / "folder"
    seed = 0
    for split in ("train", "val", "test"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                seed += 1
                (root / split / label / f"{i}.ppm").write_bytes(_ppm(seed))
    bad = {
        "train/cat/text_named_png.png": b"<html>404 not found</html>\n",
        "train/dog/empty.jpg": b"",
        "train/dog/truncated.ppm": _ppm(99)[:40],
        "val/cat/garbage.bmp": bytes(range(256)),
    }
    for name, content in bad.items():
        (root / name).write_bytes(content)
        entries.append({"kind": "image", "file": f"images/folder/{name}", "error": "BadSampleError", "match": name})


def _captions(out: Path, entries: list[dict[str, Any]]) -> None:
    folder = out / "captions"
    folder.mkdir(parents=True)
    (folder / "ok.ppm").write_bytes(_ppm(7))
    (folder / "not_an_image.ppm").write_bytes(b"P6\nthis is not an image\n")
    huge = " ".join(f"word{i % 97}" for i in range(6000))  # ~40 KB: far beyond any context length
    rows = ["filepath\ttitle", "ok.ppm\t", f"ok.ppm\t{huge}", "not_an_image.ppm\ta caption", "absent.ppm\tmissing"]
    (folder / "pairs.tsv").write_text("\n".join(rows) + "\n")
    entries += [
        {"kind": "caption", "file": "captions/pairs.tsv", "row": 0, "error": "", "match": "empty caption"},
        {"kind": "caption", "file": "captions/pairs.tsv", "row": 1, "error": "", "match": "huge caption"},
        {"kind": "caption", "file": "captions/pairs.tsv", "row": 2, "error": "BadSampleError", "match": "line 4"},
        {"kind": "caption", "file": "captions/pairs.tsv", "row": 3, "error": "BadSampleError", "match": "absent.ppm"},
    ]
    broken = {
        "no_title_column.tsv": ("filepath\tcaption\nok.ppm\thello\n", "data.caption_key"),
        "empty_image_field.tsv": ("filepath\ttitle\nok.ppm\thello\n\tno image\n", "line 3"),
        "comma_separated.tsv": ("filepath,title\nok.ppm,hello\n", "separator"),
        "empty_file.tsv": ("", "data.img_key"),
    }
    for name, (text, match) in broken.items():
        (folder / name).write_text(text)
        entries.append({"kind": "caption_file", "file": f"captions/{name}", "error": "DataConfigError", "match": match})


def _conversations(out: Path, entries: list[dict[str, Any]]) -> None:
    folder = out / "conversations"
    folder.mkdir(parents=True)
    (folder / "red.ppm").write_bytes(_ppm(11))
    (folder / "not_an_image.png").write_bytes(b"GIF89a but not really\n")

    def turns(*pairs: tuple[str, Any]) -> list[dict[str, Any]]:
        return [{"from": role, "value": value} for role, value in pairs]

    ok = turns(("human", "<image>\nWhat colour?"), ("gpt", "red"))
    cases: dict[str, tuple[Any, str]] = {
        # name: (file content (JSON value, or raw text), the field the error names)
        "missing_answer": ([{"id": "a", "image": "red.ppm", "conversations": ok[:1]}], "conversations"),
        "no_turns": ([{"id": "b", "conversations": []}], "conversations"),
        "no_conversations_key": ([{"id": "c", "image": "red.ppm"}], "conversations"),
        "wrong_first_role": ([{"id": "d", "conversations": turns(("gpt", "hi"), ("human", "hello"))}], "[0].from"),
        "unknown_role": ([{"id": "e", "conversations": turns(("human", "q"), ("assistant", "a"))}], "[1].from"),
        "value_not_string": ([{"id": "f", "conversations": turns(("human", "q"), ("gpt", 42))}], "[1].value"),
        "image_in_answer": ([{"id": "g", "conversations": turns(("human", "q"), ("gpt", "<image>"))}], "[1].value"),
        "two_placeholders_one_image": (
            [{"id": "h", "image": "red.ppm", "conversations": turns(("human", "<image><image>q"), ("gpt", "a"))}],
            "image",
        ),
        "missing_image_file": ([{"id": "i", "image": "absent.png", "conversations": ok}], "image"),
        "record_not_object": (["just a string"], "record"),
        "not_a_list": ({"id": "j", "conversations": ok}, "list of conversation records"),
        "invalid_json": ('[{"id": "k", "conversations": [', "not valid JSON"),
        "image_not_an_image": ([{"id": "l", "image": "not_an_image.png", "conversations": ok}], "not_an_image.png"),
    }
    for name, (content, field) in cases.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=1) + "\n"
        (folder / f"{name}.json").write_text(text)
        error = "DataConfigError" if name in ("not_a_list", "invalid_json") else "ConversationFormatError"
        if name == "image_not_an_image":
            error = "BadSampleError"  # the record is valid; reading its image fails
        entries.append({"kind": "conversation", "file": f"conversations/{name}.json", "error": error, "match": field})


def make_corpus(out: str | Path) -> list[dict[str, Any]]:
    """(Re)write the whole corpus into ``out`` (removed first) and return the manifest entries."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    entries: list[dict[str, Any]] = []
    _checkpoints(out, entries)
    _cards(out, entries)
    _images(out, entries)
    _captions(out, entries)
    _conversations(out, entries)
    (out / "overrides.json").write_text(json.dumps(OVERRIDES, indent=1) + "\n")
    (out / "calls.json").write_text(json.dumps(CALLS, indent=1) + "\n")  # inf and nan as JSON's Infinity/NaN
    manifest = {"arch": ARCH, "marker": MARKER, "entries": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(DEFAULT_OUT), help="folder to (re)write")
    args = parser.parse_args(argv)
    entries = make_corpus(args.out)
    size = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
    errors = sum(1 for entry in entries if entry["error"]) + len(OVERRIDES) + sum(1 for call in CALLS if call["error"])
    cases = len(entries) + len(OVERRIDES) + len(CALLS)
    parts = f"{len(entries)} files, {len(OVERRIDES)} overrides, {len(CALLS)} calls"
    print(f"{parts}: {cases} cases, {errors} of them errors")
    print(f"{size} bytes in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
