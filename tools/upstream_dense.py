"""Generate the dense upstream fixtures (timm ViT, open_clip CLIP) with the upstream code itself.

    python tools/upstream_dense.py --timm /path/to/pytorch-image-models --timm-commit <40 hex> \\
        --open-clip /path/to/open_clip --open-clip-commit <40 hex> [--out tests/data/upstream]

The upstream packages are imported from the given checkouts (``timm/`` at the root of
huggingface/pytorch-image-models, ``src/open_clip`` of mlfoundations/open_clip), not from the environment,
and the script checks that they were. For each fixture it builds a tiny model with the upstream's own
constructor, redraws every parameter with seeded random values (norm scales ``1 + 0.2 n``, everything else
``0.2 n``, so no zero/one init hides a mapping bug), writes it with the upstream's own writer, runs fixed
inputs through the upstream forward and stores inputs and outputs as safetensors:

- ``timm_vit_tiny/``: ``timm.create_model("vit_small_patch16_224", ...)`` at tiny size (the architecture of
  the ``augreg_in21k`` dense checkpoints the timm-format zoo cards upcycle: class token, token pooling,
  exact GELU, no QK-norm), saved by ``timm.models.save_for_hf`` (``model.safetensors`` + ``config.json``,
  what timm's Hub push uploads);
- ``timm_vit_tiny_gap/``: the same with the Soft MoE paper's layout (no class token, global average
  pooling, QK-norm, tanh GELU), to show the converter and upcycling carry those options too;
- ``open_clip_tiny/``: ``open_clip.create_model`` of a tiny ViT CLIP config (registered with
  ``open_clip.add_model_config``), saved by ``open_clip.push_to_hf_hub.save_for_hf``
  (``open_clip_model.safetensors`` + ``open_clip_config.json``, what open_clip's Hub push uploads).

Outputs (``outputs.safetensors``): timm: ``logits`` (``model(x)``), ``features`` (``forward_features``),
``pre_logits`` (``forward_head(features, pre_logits=True)``), ``block{i}`` / ``block{i}_prefix`` (patch and
prefix tokens after block ``i``, from ``forward_intermediates(output_fmt="NLC", return_prefix_tokens=True)``);
open_clip: ``image_embedding`` (``encode_image``), ``text_embedding`` (``encode_text``), ``image_features``,
``text_features``, ``logit_scale`` (``forward(image, text)`` with ``output_dict=True``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import torch

TIMM_TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
TIMM_GAP = dict(class_token=False, global_pool="avg", qk_norm=True, act_layer="gelu_tanh")
CLIP_TINY = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2},
}


def _import_from(checkout: Path, package: str, subdir: str = ""):
    root = (checkout / subdir).resolve()
    sys.path.insert(0, str(root))
    module = __import__(package)
    if not Path(module.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"{package} was imported from {module.__file__}, not from the checkout {root}")
    return module


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter redrawn: norm scales ``1 + 0.2 n``, all other parameters ``0.2 n`` (``n ~ N(0, 1)``)."""
    generator = torch.Generator().manual_seed(seed)
    norms = {name for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            module, _, kind = name.rpartition(".")
            param.copy_(noise + 1.0 if module in norms and kind == "weight" else noise)


def _write(folder: Path, upstream: str, commit: str, inputs: dict, outputs: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in inputs.items()}, folder / "inputs.safetensors")
    save_file({k: v.detach().contiguous() for k, v in outputs.items()}, folder / "outputs.safetensors")
    meta = {"upstream": upstream, "commit": commit, "generator": "tools/upstream_dense.py"}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def timm_fixture(timm, folder: Path, commit: str, options: dict, seed: int) -> None:
    from timm.models import save_for_hf

    model_args = {**TIMM_TINY, **options}
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **model_args).eval()
    randomise(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(folder), model_args=model_args, safe_serialization=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        features = model.forward_features(x)
        outputs = {
            "logits": model(x),
            "features": features,
            "pre_logits": model.forward_head(features, pre_logits=True),
        }
        blocks = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True)
    for i, block in enumerate(blocks):
        patches, prefix = block if isinstance(block, tuple) else (block, None)
        outputs[f"block{i}"] = patches
        if prefix is not None:
            outputs[f"block{i}_prefix"] = prefix
    _write(folder, "huggingface/pytorch-image-models", commit, {"image": x}, outputs)


class _NoTokenizer:
    """open_clip's ``save_for_hf`` also saves a Hugging Face tokenizer; the tiny CLIP has none (no numerics)."""

    def save_pretrained(self, directory: str) -> None:
        pass


def open_clip_fixture(open_clip, folder: Path, commit: str, seed: int) -> None:
    from open_clip.push_to_hf_hub import save_for_hf

    with tempfile.TemporaryDirectory() as configs:
        (Path(configs) / "mome-tiny-clip.json").write_text(json.dumps(CLIP_TINY))
        open_clip.add_model_config(configs)
        model = open_clip.create_model("mome-tiny-clip", output_dict=True).eval()
    randomise(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, _NoTokenizer(), CLIP_TINY, str(folder), safe_serialization=True)
    generator = torch.Generator().manual_seed(seed + 1)
    image = torch.randn(2, 3, 16, 16, generator=generator)
    vocab = CLIP_TINY["text_cfg"]["vocab_size"]
    text = torch.randint(1, vocab - 1, (2, 8), generator=generator)
    text[0, 7] = vocab - 1  # end of text (the argmax) at the last position
    text[1, 4], text[1, 5:] = vocab - 1, 0  # ... and before padding
    with torch.no_grad():
        out = model(image, text)
        outputs = {
            "image_embedding": model.encode_image(image),
            "text_embedding": model.encode_text(text),
            "image_features": out["image_features"],
            "text_features": out["text_features"],
            "logit_scale": out["logit_scale"].reshape(1),
        }
    _write(folder, "mlfoundations/open_clip", commit, {"image": image, "text": text}, outputs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timm", type=Path, required=True, help="a pytorch-image-models checkout")
    parser.add_argument("--timm-commit", required=True, help="its git commit (40 hex)")
    parser.add_argument("--open-clip", type=Path, required=True, help="an open_clip checkout")
    parser.add_argument("--open-clip-commit", required=True, help="its git commit (40 hex)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "tests" / "data" / "upstream")
    args = parser.parse_args(argv)
    for commit in (args.timm_commit, args.open_clip_commit):
        if not re.fullmatch(r"[0-9a-f]{40}", commit):
            raise SystemExit(f"not a 40-hex git commit: {commit}")
    torch.manual_seed(0)
    timm = _import_from(args.timm, "timm")
    open_clip = _import_from(args.open_clip, "open_clip", "src")
    print(f"timm {timm.__version__} from {timm.__file__}; open_clip {open_clip.__version__} from {open_clip.__file__}")
    timm_fixture(timm, args.out / "timm_vit_tiny", args.timm_commit, {}, seed=0)
    timm_fixture(timm, args.out / "timm_vit_tiny_gap", args.timm_commit, TIMM_GAP, seed=10)
    open_clip_fixture(open_clip, args.out / "open_clip_tiny", args.open_clip_commit, seed=20)


if __name__ == "__main__":
    main()
