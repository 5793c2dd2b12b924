"""Training-step speed of mome's MoE models against dense twins with the same active FLOPs.

One process, side by side, interleaved rounds (each round runs one training step of every model:
forward, backward, AdamW step), median over ``--repeats`` rounds after warm-up. Example::

    python tools/bench_models.py                     # V-MoE S/32 (E=8, k=2) at batch 32, 224 px
    python tools/bench_models.py --batch-size 8 --models vmoe_s32_e8 --json out.json

The dense twin of a sparse MoE model is the same timm ViT with the FFN of each MoE block widened to
``k * H`` (``k`` experts of width ``H`` are active per token); timm's ``vit_small_patch32_224``
(12 layers of width 384) is timed too, for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
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


def train_step_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, labels) + sum(mome.aux_losses(model).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bench(names: list[str], batch_size: int, repeats: int, warmup: int) -> list[dict]:
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = mome.create_model(name, num_classes=1000)
        size = model.patch_embed.img_size
        images = torch.randn(batch_size, 3, *size)
        labels = torch.randint(0, 1000, (batch_size,))
        candidates = {
            name: model,
            f"{name} dense twin (same active FLOPs)": dense_twin(model),
            "timm vit_small_patch32_224": timm.create_model("vit_small_patch32_224", img_size=size),
        }
        steps = {label: train_step_fn(m, images, labels) for label, m in candidates.items()}
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
    parser.add_argument("--models", nargs="+", default=["vmoe_s32_e8"])
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
