"""Write the V-MoE and Soft MoE fidelity fixtures with google-research/vmoe's own code.

Usage (a scratch venv with jax, flax, optax, ml_collections, absl-py, chex, einops, msgpack, scipy;
none of them is a mome dependency)::

    python tools/upstream_vmoe.py --vmoe /path/to/google-research/vmoe \\
        --vit-jax /path/to/google-research/vision_transformer --out tests/data/upstream

For every fixture this script builds a tiny model with vmoe's own classes
(``vmoe.nn.vit_moe.VisionTransformerMoe``; its MoE blocks use ``vmoe.nn.routing.NoisyTopExpertsPerItemRouter``
or ``vmoe.projects.soft_moe.router.SoftRouter``), initialises it with ``Module.init``, re-draws *every*
parameter with seeded random values (layer-norm scales ``1 + 0.2 N``, everything else ``0.3 N``, router
kernels ``N``: no zero or one initialisation can hide a mapping bug), saves the parameters with vmoe's
own sharded writer ``vmoe.checkpoints.partitioned.save_checkpoint`` (``ckpt.index`` +
``ckpt.data-nnnnn-of-NNNNN``, the layout of the released checkpoints), and runs fixed inputs through
``Module.apply`` in deterministic (eval) mode with ``capture_intermediates=True``. It writes the inputs
and the upstream outputs to ``outputs.npz`` and a ``meta.json``/``README.md`` per folder.

vmoe imports ``tensorflow`` only for ``tensorflow.io.gfile`` (file I/O in ``vmoe.checkpoints.base``).
When tensorflow is not installed a stand-in module maps ``gfile.GFile/exists/makedirs/glob/remove/rename``
onto the Python standard library; it touches no number. ``vit_jax`` (``models_vit``: ``MlpBlock``,
``AddPositionEmbs``, ``IdentityLayer``) comes from the google-research/vision_transformer checkout.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SIZE, PATCH, WIDTH, HEADS, MLP_DIM, NUM_CLASSES, EXPERTS, TOP_K = 16, 4, 16, 2, 32, 10, 4, 2
GROUP_IMAGES = 8  # vmoe_paper/common.py: group_size = 8 images ("min_batch_size_per_device")
BATCH_VMOE, BATCH_SOFT = 16, 4  # 16 images = 2 routing groups of 8


def _gfile_shim() -> None:
    """``tensorflow.io.gfile`` on the standard library (vmoe's only use of tensorflow here)."""
    try:
        import tensorflow  # noqa: F401

        return
    except ImportError:
        pass
    gfile = types.ModuleType("tensorflow.io.gfile")
    gfile.GFile = open
    gfile.exists = os.path.exists
    gfile.makedirs = lambda path: os.makedirs(path, exist_ok=True)
    gfile.glob = glob.glob
    gfile.remove = os.remove

    def rename(src: str, dst: str, overwrite: bool = False) -> None:
        if not overwrite and os.path.exists(dst):
            raise FileExistsError(dst)
        os.replace(src, dst)

    gfile.rename = rename
    tf_io = types.ModuleType("tensorflow.io")
    tf_io.gfile = gfile
    tf = types.ModuleType("tensorflow")
    tf.io = tf_io
    sys.modules.update({"tensorflow": tf, "tensorflow.io": tf_io, "tensorflow.io.gfile": gfile})


def _git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ------------------------------------------------------------------------------------------ configs
def vmoe_config(
    *, depth: int, moe_layers: tuple[int, ...], representation_size: int | None, capacity_factor: float, bfloat16: bool
) -> dict[str, Any]:
    """The kwargs of ``VisionTransformerMoe`` as ``vmoe/configs/vmoe_paper/common.py:get_vmoe_config`` builds them,
    at tiny size (depth, width, experts), with the evaluation capacity factor."""
    tokens = (IMAGE_SIZE // PATCH) ** 2 + 1
    return dict(
        num_classes=NUM_CLASSES,
        patch_size=(PATCH, PATCH),
        hidden_size=WIDTH,
        classifier="token",
        representation_size=representation_size,
        encoder=dict(
            num_layers=depth,
            mlp_dim=MLP_DIM,
            num_heads=HEADS,
            dropout_rate=0.0,
            attention_dropout_rate=0.0,
            moe=dict(
                num_experts=EXPERTS,
                layers=moe_layers,
                dropout_rate=0.0,
                split_rngs=False,
                group_size=GROUP_IMAGES * tokens,
                router=dict(
                    num_selected_experts=TOP_K,
                    noise_std=1.0,
                    importance_loss_weight=0.005,
                    load_loss_weight=0.005,
                    dispatcher=dict(
                        name="einsum",
                        bfloat16=bfloat16,
                        capacity_factor=capacity_factor,
                        batch_priority=False,
                    ),
                ),
            ),
        ),
    )


def soft_config(*, depth: int, slots: int) -> dict[str, Any]:
    """``vmoe/projects/soft_moe/configs/common.py:get_vmoe_soft_router_config`` at tiny size: GAP head,
    QK-norm, Soft MoE in the last half of the blocks, one routing group per image."""
    return dict(
        num_classes=NUM_CLASSES,
        patch_size=(PATCH, PATCH),
        hidden_size=WIDTH,
        classifier="gap",
        encoder=dict(
            num_layers=depth,
            mlp_dim=MLP_DIM,
            num_heads=HEADS,
            dropout_rate=0.0,
            attention_dropout_rate=0.0,
            attention_qk_norm=True,
            moe=dict(
                layers=tuple(range(depth))[-depth // 2 :],
                num_experts=EXPERTS,
                group_size=(IMAGE_SIZE // PATCH) ** 2,
                split_rngs=False,
                router=dict(
                    name="vmoe.projects.soft_moe.router.SoftRouter",
                    capacity_factor=None,
                    num_slots=slots,
                    compute_similarity_metrics=False,
                ),
            ),
        ),
    )


#: folder -> (kind, model options, {output set: forward options}, cards it covers)
FIXTURES: dict[str, dict[str, Any]] = {
    "vmoe_last2_prelogits": dict(
        kind="vmoe",
        model=dict(depth=6, moe_layers=(3, 5), representation_size=WIDTH),
        runs={"cf4": 4.0, "cf1.05": 1.05},
        wrap_params=True,
        seed=0,
        covers=["vmoe_s32_e8.in1k_randaug_light1", "vmoe_s32_e8.in1k_randaug_medium"],
        about="V-MoE S/32 pre-training layout: MoE in the last 2 odd blocks, pre_logits Dense+tanh "
        "(representation_size = hidden_size), token groups of 8 images; evaluated at the config's eval "
        "capacity factor 4.0 and at 1.05 (tokens dropped)",
    ),
    "vmoe_last2_ft": dict(
        kind="vmoe",
        model=dict(depth=6, moe_layers=(3, 5), representation_size=None),
        runs={"cf1.5": 1.5},
        wrap_params=False,
        seed=1,
        covers=["vmoe_s32_e8.in1k_randaug_light1_ft_in1k_384"],
        about="V-MoE S/32 fine-tuned layout: MoE in the last 2 odd blocks, no pre_logits, token groups of 8 "
        "images, capacity factor 1.5",
    ),
    "vmoe_every2": dict(
        kind="vmoe",
        model=dict(depth=4, moe_layers=(1, 3), representation_size=None),
        runs={"cf1.05": 1.05, "cf1.5": 1.5},
        wrap_params=False,
        seed=2,
        covers=["vmoe_b16_e8.in21k_randaug_strong", "vmoe_b16_e8.in21k_randaug_strong_ft_in1k_384"],
        about="V-MoE B/16 layout: MoE in every odd block, no pre_logits (pretrain_imagenet21k.py and the "
        "fine-tuning config set representation_size=None), token groups of 8 images; capacity factors 1.05 "
        "(pre-training) and 1.5 (fine-tuned)",
    ),
    "soft_moe_gap": dict(
        kind="soft",
        model=dict(depth=4, slots=2),
        runs={"bf16": None},
        wrap_params=False,
        seed=3,
        covers=[],
        about="Soft MoE ViT (Soft MoE paper configs): GAP head after encoder_norm, QK-norm, Soft MoE in the "
        "last half of the blocks, 2 slots per expert, one routing group per image; SoftRouter always wraps "
        "its dispatcher in Bfloat16Dispatcher, so the only upstream outputs are the bf16-dispatch ones",
    ),
}


# ------------------------------------------------------------------------------------------ helpers
def redraw(params: Any, seed: int) -> Any:
    """Every leaf re-drawn from a seeded normal (see the module docstring for the scales)."""
    import flax.traverse_util
    import jax.numpy as jnp

    flat = flax.traverse_util.flatten_dict(params)
    rng = np.random.default_rng(seed)
    out = {}
    for path in sorted(flat):
        shape, name, joined = flat[path].shape, path[-1], "/".join(path)
        noise = rng.standard_normal(shape).astype(np.float32)
        if name == "scale" and "Router" not in path:  # LayerNorm (and query_ln/key_ln) scales
            value = 1.0 + 0.2 * noise
        elif "Router" in path and name == "scale":  # Soft MoE's learned logit scale
            value = 2.0 + 0.5 * noise
        elif "Router" in joined:  # router kernels / mu: large, for decisive and unbalanced routing
            value = noise
        else:
            value = 0.3 * noise
        out[path] = jnp.asarray(value, dtype=flat[path].dtype)
    return flax.traverse_util.unflatten_dict(out)


def _combine_per_expert(dispatcher: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``(combine [G, S, E, C or P], dispatch or None)`` of an (optionally bf16-wrapped) EinsumDispatcher."""
    inner = getattr(dispatcher, "dispatcher", dispatcher)  # Bfloat16Dispatcher wraps the einsum one
    combine = np.asarray(inner.combine_weights, dtype=np.float32)
    dispatch = inner.dispatch_weights
    return combine, None if dispatch is None else np.asarray(dispatch, dtype=np.float32)


def run_model(model: Any, params: Any, images: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """Upstream forward in eval mode; logits, encoder output, pooled pre-logits and routing weights."""
    import jax.numpy as jnp

    (logits, metrics), state = model.apply(
        {"params": params}, jnp.asarray(images), capture_intermediates=True, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    outputs = {"logits": np.asarray(logits, dtype=np.float32)}
    encoded, _ = inter["Encoder"]["__call__"][0]
    outputs["features"] = np.asarray(encoded, dtype=np.float32)  # after encoder_norm, [B, N, D]
    pre = inter["pre_logits"]["__call__"][0]  # Dense output (or the pooled tokens under IdentityLayer)
    if model.representation_size is not None:
        pre = jnp.tanh(pre)  # VisionTransformerMoe applies nn.tanh after the pre_logits Dense
    outputs["pre_logits"] = np.asarray(pre, dtype=np.float32)
    for block, entry in sorted(inter["Encoder"].items()):
        if not block.startswith("encoderblock_") or "Moe" not in entry:
            continue
        index = int(block.rsplit("_", 1)[1])
        dispatcher, _ = entry["Moe"]["Router"]["__call__"][0]
        combine, dispatch = _combine_per_expert(dispatcher)
        if kind == "vmoe":  # [G, S, E, C] -> weight of each expert for each token, 0 where dropped
            outputs[f"combine_weights.{index}"] = combine.sum(-1).reshape(-1, combine.shape[2])
        else:  # Soft MoE: [G, M, E, P] -> [G, M, E*P] (slot e*P + p)
            outputs[f"combine_weights.{index}"] = combine.reshape(*combine.shape[:2], -1)
            outputs[f"dispatch_weights.{index}"] = dispatch.reshape(*dispatch.shape[:2], -1)
        if kind == "vmoe":
            outputs[f"importance_loss.{index}"] = np.asarray(metrics[block]["importance_loss"], dtype=np.float32)
    return outputs


def write_fixture(folder: str, spec: dict[str, Any], out: Path, vmoe_commit: str, vit_commit: str | None) -> None:
    import jax
    import jax.numpy as jnp
    from vmoe.checkpoints import partitioned
    from vmoe.nn.vit_moe import VisionTransformerMoe

    target = out / folder
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    kind, seed = spec["kind"], spec["seed"]
    batch = BATCH_VMOE if kind == "vmoe" else BATCH_SOFT
    images = np.random.default_rng(100 + seed).uniform(-1, 1, (batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)

    def build(run_option: Any, bfloat16: bool) -> Any:
        if kind == "vmoe":
            cfg = vmoe_config(**spec["model"], capacity_factor=run_option, bfloat16=bfloat16)
        else:
            cfg = soft_config(**spec["model"])
        return VisionTransformerMoe(**cfg, deterministic=True)

    first_option = next(iter(spec["runs"].values()))
    init_model = build(first_option, False)
    params = init_model.init({"params": jax.random.PRNGKey(seed)}, jnp.asarray(images[:GROUP_IMAGES]))["params"]
    params = redraw(params, seed)
    tree = {"params": params} if spec["wrap_params"] else params
    # vmoe's own writer; small chunks and two shards, so the reader must assemble chunks across files.
    partitioned.save_checkpoint(str(target / "ckpt"), tree, num_shards=2, max_chunk_bytes=1024).wait()

    arrays: dict[str, np.ndarray] = {"images": images}
    summary: dict[str, Any] = {}
    for run, option in spec["runs"].items():
        precisions = ("bf16",) if kind == "soft" else ("fp32", "bf16")
        for precision in precisions:
            model = build(option, precision == "bf16")
            outputs = run_model(model, params, images, kind)
            prefix = run if kind == "soft" else f"{run}.{precision}"
            for name, value in outputs.items():
                arrays[f"{prefix}/{name}"] = value
            if kind == "vmoe":
                kept = {
                    k: float((v > 0).sum() / (v.shape[0] * TOP_K))
                    for k, v in outputs.items()
                    if k.startswith("combine_weights.")
                }
                summary[prefix] = {"kept_assignment_fraction": kept}
    np.savez_compressed(target / "outputs.npz", **arrays)

    cfg_record = (
        vmoe_config(**spec["model"], capacity_factor=first_option, bfloat16=False)
        if kind == "vmoe"
        else soft_config(**spec["model"])
    )
    meta = {
        "upstream": "google-research/vmoe",
        "commit": vmoe_commit,
        "generator": "tools/upstream_vmoe.py",
        "vit_jax": {"upstream": "google-research/vision_transformer", "commit": vit_commit},
        "model": "vmoe.nn.vit_moe.VisionTransformerMoe",
        "config": json.loads(json.dumps(cfg_record, default=list)),
        "runs": {k: v for k, v in spec["runs"].items()},
        "checkpoint": "ckpt.index" + (" (tree {'params': ...})" if spec["wrap_params"] else " (params tree)"),
        "batch_images": batch,
        "covers_cards": spec["covers"],
        "routing": summary,
    }
    (target / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (target / "README.md").write_text(_readme(folder, spec, meta))


def _readme(folder: str, spec: dict[str, Any], meta: dict[str, Any]) -> str:
    runs = spec["runs"]
    if spec["kind"] == "vmoe":
        sets = "\n".join(
            f"- `{run}.fp32/*`, `{run}.bf16/*`: capacity factor {cf} with `dispatcher.bfloat16` False / True"
            for run, cf in runs.items()
        )
    else:
        sets = "- `bf16/*`: the SoftRouter's forward (always Bfloat16Dispatcher, hard-coded upstream)"
    if spec["kind"] == "vmoe":
        routing = (
            "`combine_weights` summed over the capacity axis, `[groups*group_size, experts]`, 0 where capacity "
            "dropped the token); `importance_loss.<block>` (the router's metric, one per group"
        )
    else:
        routing = "`combine_weights` and `dispatch_weights` reshaped to `[groups, tokens, experts*slots]`"
    command = "python tools/upstream_vmoe.py --vmoe <vmoe> --vit-jax <vision_transformer> --out tests/data/upstream"
    return f"""# {folder}

{spec["about"]}.

Produced by google-research/vmoe at commit `{meta["commit"]}` (vit_jax from
google-research/vision_transformer at `{meta["vit_jax"]["commit"]}`) with:

    {command}

Files:

- `ckpt.index`, `ckpt.data-0000{{0,1}}-of-00002`: the re-drawn parameters (every leaf seeded-random, see the
  generator's docstring) written by `vmoe.checkpoints.partitioned.save_checkpoint` (vmoe's sharded format,
  `Version.V1`, 1 KiB chunks over 2 shards){" under a `params` subtree" if spec["wrap_params"] else ""}.
- `outputs.npz`: `images` (the inputs, NHWC, uniform in [-1, 1]) and, per output set,
{sets}

  each holding the outputs of `vmoe.nn.vit_moe.VisionTransformerMoe.apply` (deterministic, fp32 model,
  `capture_intermediates=True`): `logits`; `features` (the `Encoder` output, after `encoder_norm`);
  `pre_logits` (the head's input: `tanh` of the `pre_logits` Dense output, or the pooled tokens when
  `representation_size` is None); `combine_weights.<block>` (the Router's dispatcher:
  {routing}).
- `meta.json`: upstream repo and commit, the model config, which cards the fixture covers, and the share
  of routed assignments kept under capacity per MoE block.

Shim: vmoe imports `tensorflow.io.gfile` for file I/O only; without tensorflow the generator maps it onto
the Python standard library (`open`, `os`, `glob`). It changes no number.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vmoe", required=True, type=Path, help="google-research/vmoe checkout")
    parser.add_argument("--vit-jax", required=True, type=Path, help="google-research/vision_transformer checkout")
    parser.add_argument("--out", required=True, type=Path, help="e.g. tests/data/upstream")
    parser.add_argument("--commit", help="vmoe commit, when the checkout is not a git work tree")
    parser.add_argument("--vit-jax-commit", help="vision_transformer commit, when not a git work tree")
    parser.add_argument("--only", nargs="*", help="fixture folders to write (default: all)")
    args = parser.parse_args(argv)
    _gfile_shim()
    sys.path[:0] = [str(args.vmoe), str(args.vit_jax)]
    commit = args.commit or _git_commit(args.vmoe)
    if not commit:
        parser.error("cannot tell the vmoe commit: pass --commit")
    vit_commit = args.vit_jax_commit or _git_commit(args.vit_jax)
    for folder, spec in FIXTURES.items():
        if args.only and folder not in args.only:
            continue
        write_fixture(folder, spec, args.out, commit, vit_commit)
        print(f"wrote {args.out / folder}")


if __name__ == "__main__":
    main()
