"""Training-step speed of mome's MoE models against dense twins with the same active FLOPs.

One process, side by side, interleaved rounds (each round runs one training step of every model:
forward, backward, AdamW step), median over ``--repeats`` rounds after warm-up. Example::

    python tools/bench_models.py                     # V-MoE S/32 (E=8, k=2) at 224 px and LIMoE tiny, batch 32
    python tools/bench_models.py --batch-size 8 --models vmoe_s32_e8 --json out.json

The dense twin of a sparse MoE model is the same timm ViT with the FFN of each MoE block widened to
``k * H`` (``k`` experts of width ``H`` are active per token); timm's ``vit_small_patch32_224``
(12 layers of width 384) is timed too, for reference. The dense twin of a (top-1) LIMoE is the same
one-tower model without MoE layers, trained with the same CLIP loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.layers import Mlp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mome  # noqa: E402
from mome.layers import MoE  # noqa: E402


def dense_twin(model: nn.Module) -> nn.Module:
    """A timm ViT like ``model`` whose MoE FFNs are dense FFNs of width ``k * H``."""
    twin = timm.models.vision_transformer.VisionTransformer(
        img_size=model.patch_embed.img_size,
        patch_size=model.patch_embed.patch_size,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=model.blocks[0].attn.num_heads,
        num_classes=model.num_classes,
        act_layer="gelu_tanh",
    )
    for index, block in enumerate(model.blocks):
        if isinstance(block.mlp, MoE):
            experts = block.mlp.experts
            width = block.mlp.router.top_k * experts.hidden_dim
            twin.blocks[index].mlp = Mlp(experts.dim, width, act_layer=type(experts.act))
    return twin


def train_step_fn(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> Callable[[], None]:
    """One training step: forward, task loss + ``mome.aux_losses``, backward, AdamW step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        loss = loss_fn(model) + sum(mome.aux_losses(model).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def vision_candidates(name: str, batch_size: int):
    """A ViT MoE model, its dense twin and timm's ViT-S/32, with a classification loss."""
    model = mome.create_model(name, num_classes=1000)
    size = model.patch_embed.img_size
    images, labels = torch.randn(batch_size, 3, *size), torch.randint(0, 1000, (batch_size,))
    candidates = {
        name: model,
        f"{name} dense twin (same active FLOPs)": dense_twin(model),
        "timm vit_small_patch32_224": timm.create_model("vit_small_patch32_224", img_size=size),
    }
    return candidates, lambda m: nn.functional.cross_entropy(m(images), labels)


def contrastive_candidates(name: str, batch_size: int):
    """A LIMoE model and its dense one-tower twin (top-1: one expert = one dense FFN), CLIP loss."""
    model = mome.create_model(name)
    if model.moe_layer_indices and model.blocks[model.moe_layer_indices[0]].mlp.router.top_k != 1:
        raise ValueError(f"{name}: the dense twin of a top-k>1 LIMoE is not implemented here")
    size = model.pretrained_cfg.input_size[1:]
    images = torch.randn(batch_size, 3, *size)
    texts = mome.get_tokenizer(name)([f"a photo of object number {i}" for i in range(batch_size)])
    targets = torch.arange(batch_size)

    def clip_loss(m):
        image_features, text_features, scale = m(images, texts)
        logits = scale * image_features @ text_features.t()
        return (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.t(), targets)) / 2

    candidates = {name: model, f"{name} dense twin (same active FLOPs)": mome.create_model(name, moe_layers="none")}
    return candidates, clip_loss


def bench(names: list[str], batch_size: int, repeats: int, warmup: int) -> list[dict]:
    rows = []
    for name in names:
        torch.manual_seed(0)
        build = contrastive_candidates if name.startswith("limoe") else vision_candidates
        candidates, loss_fn = build(name, batch_size)
        steps = {label: train_step_fn(m, loss_fn) for label, m in candidates.items()}
        for step in steps.values():
            for _ in range(warmup):
                step()
        samples: dict[str, list[float]] = {label: [] for label in steps}
        for _ in range(repeats):
            for label, step in steps.items():
                start = time.perf_counter()
                step()
                samples[label].append(time.perf_counter() - start)
        twin_time = statistics.median(samples[f"{name} dense twin (same active FLOPs)"])
        for label, values in samples.items():
            seconds = statistics.median(values)
            params = sum(p.numel() for p in candidates[label].parameters())
            rows.append(
                {
                    "model": label,
                    "batch_size": batch_size,
                    "step_s": seconds,
                    "images_per_s": batch_size / seconds,
                    "ratio_to_dense_twin": seconds / twin_time,
                    "params_m": params / 1e6,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vmoe_s32_e8", "limoe_tiny_patch8_e4"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = bench(args.models, args.batch_size, args.repeats, args.warmup)
    print(f"training step (fwd+bwd+AdamW), batch {args.batch_size}, {args.threads} threads, fp32")
    print(f"{'model':52s} {'step (s)':>9s} {'img/s':>8s} {'ratio':>7s} {'params (M)':>11s}")
    for row in rows:
        print(
            f"{row['model']:52s} {row['step_s']:9.3f} {row['images_per_s']:8.1f} "
            f"{row['ratio_to_dense_twin']:7.2f} {row['params_m']:11.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
