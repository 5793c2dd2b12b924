"""A layer-level demo without Lightning or Hydra: train a small stack of MoE blocks on synthetic data.

The task: each sequence holds 16 tokens drawn around one of ``num_classes`` random prototypes (plus
noise); the model must tell which. Every block is pre-norm self-attention (timm ``Attention``) plus a
``SparseMoE`` FFN with a load-balancing loss. The script prints the task loss, the aux loss and the
per-expert load of each MoE layer as it trains, then the held-out accuracy, and exits non-zero if
the loss did not fall. Runs in well under a minute on 2 CPU cores::

    python tools/train_synthetic.py --steps 300 --experts 8 --top-k 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from timm.layers import Attention
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mome  # noqa: E402
from mome.layers import SparseMoE  # noqa: E402


class MoEBlock(nn.Module):
    """Pre-norm transformer block whose FFN is a sparse MoE: ``x + attn(ln(x))``, ``x + moe(ln(x))``."""

    def __init__(self, dim: int, heads: int, moe: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.moe = nn.LayerNorm(dim), moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.moe(self.norm2(x))


class SyntheticSequences:
    """Sequences of noisy copies of a class prototype: ``x[b, n] = P[y_b] + sigma * eps``."""

    def __init__(self, num_classes: int, dim: int, length: int, noise: float, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(num_classes, dim, generator=self.generator)
        self.num_classes, self.length, self.noise = num_classes, length, noise

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, self.num_classes, (size,), generator=self.generator)
        tokens = self.prototypes[labels].unsqueeze(1).expand(-1, self.length, -1)  # [B, N, D]
        return tokens + self.noise * torch.randn(tokens.shape, generator=self.generator), labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    data = SyntheticSequences(args.classes, args.dim, length=16, noise=2.0, seed=args.seed)
    blocks = [
        MoEBlock(
            args.dim,
            4,
            SparseMoE(
                args.dim,
                2 * args.dim,
                args.experts,
                args.top_k,
                renormalize=True,
                capacity_factor=args.capacity_factor,
                eval_capacity_factor=None,
                aux_loss_weights={"load_balance": 0.01, "z_loss": 0.001},
            ),
        )
        for _ in range(args.depth)
    ]
    model = nn.Sequential(*blocks, nn.LayerNorm(args.dim))
    head = nn.Linear(args.dim, args.classes)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.01)

    print(f"training {args.depth} MoE blocks (E={args.experts}, k={args.top_k}, D={args.dim}) for {args.steps} steps")
    history, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        tokens, labels = data.batch(args.batch_size)
        logits = head(model(tokens).mean(dim=1))
        task_loss = nn.functional.cross_entropy(logits, labels)
        aux = mome.aux_losses(model)
        loss = task_loss + sum(aux.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(task_loss.item())
        if step == 1 or step % args.log_every == 0:
            window = history[-args.log_every :]
            aux_text = " ".join(f"{name}={value.item():.4f}" for name, value in aux.items())
            print(f"step {step:4d}  loss {sum(window) / len(window):.4f}  {aux_text}")
            for layer, stats in mome.routing_stats(model).items():
                load = " ".join(f"{share:.2f}" for share in stats["expert_load"].tolist())
                print(f"    {layer:10s} expert load [{load}]  dropped {stats['dropped_fraction'].item():.3f}")

    model.eval()
    with torch.no_grad():
        tokens, labels = data.batch(1024)
        accuracy = (head(model(tokens).mean(dim=1)).argmax(-1) == labels).float().mean().item()
    first, last = sum(history[:20]) / 20, sum(history[-20:]) / 20
    print(
        f"done in {time.perf_counter() - start:.1f}s: loss {first:.4f} -> {last:.4f}, "
        f"held-out accuracy {accuracy:.3f} (chance {1 / args.classes:.3f})"
    )
    if not last < first:
        print("error: the training loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
