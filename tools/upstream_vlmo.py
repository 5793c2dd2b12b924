"""Generate the VLMo fixtures (``tests/data/upstream/vlmo_*``) with microsoft/unilm's ``vlmo/`` code itself.

    python tools/upstream_vlmo.py /path/to/unilm --commit <40 hex> [--out tests/data/upstream]

``/path/to/unilm`` is a checkout of microsoft/unilm (or of its ``vlmo/`` folder alone); the ``vlmo`` package
is imported from ``<path>/vlmo`` and the script checks that it was. Run it in a separate environment with
upstream's dependencies, never mome's (tests/data/upstream/vlmo_relpos_vl4m/README.md lists the versions):
torch, timm 0.4.12, transformers 4.30.2, pytorch_lightning 1.5.5, torchmetrics 0.7.3, scipy 1.13.1 (the last
with ``interp2d``), einops, safetensors, ``setuptools<70`` (``pkg_resources`` for pytorch_lightning 1.5).

Every fixture is one upstream ``vlmo.modules.vlmo_module.VLMo`` (the LightningModule of ``run.py``) built
from a config dict exactly as ``run.py`` builds it from sacred, on a tiny backbone registered here with timm's
``register_model`` the way ``multiway_transformer.py`` registers ``vlmo_base_patch16`` and
``vlmo_base_plus_patch16`` (the same ``MultiWayTransformer`` class and arguments, only the sizes shrunk):

- ``relpos`` (base and large): shared relative position bias, layer scale; 3 blocks, VL-FFN in block 2;
- ``abspos`` (base_plus): absolute ``pos_embed``, no relative bias, no layer scale; 3 blocks, VL-FFN in 1-2.

Width 16, 2 heads, FFN ratio 2, patch 4, vocabulary 40, ``max_text_len`` 8 and
``max_text_len_of_initckpt`` 12 (the 40 and 196 of the released models). Per style, one fixture per kind
of released checkpoint, with the heads its ``loss_names`` create:

- ``stage2``: ``task_textmlm_*`` (``loss_names={"textmlm": 1}``, ``max_text_len`` = 12, no VL-FFN), 16 px;
- ``vl4m``: ``task_mlm_itm_itc_*`` (ITC + VL-ITC, ITM, MLM), 16 px;
- ``irtr``: ``task_finetune_irtr_{coco,f30k}_*_image384`` (ITC only), 24 px (the 384 of the cards);
- ``nlvr2``: ``task_finetune_nlvr2_*_image384`` (NLVR2 head, 3 token types), 24 px;
- ``vqa``: ``task_finetune_vqa_*_image480`` (VQA classifier, 7 answers), 28 px (the 480);
- ``resize``: no checkpoint of its own: upstream's ``load_pretrained_weight`` loads the ``vl4m`` checkpoint
  into a 24 px model (geometric-progression ``interp2d`` of the relative table, bicubic ``pos_embed``), and
  its outputs are stored: what the converter must reproduce when a card's size differs from the file's.

Every parameter is re-drawn with seeded random values (LayerNorm scales ``1 + 0.1 n``, layer scales
``0.5 + 0.2 n``, other vectors ``0.1 n``, embeddings and the relative table ``0.5 n``, matrices
``n / sqrt(fan_in)``, logit scales ``log(1/0.07) + 0.2 n``) so that no zero/one init hides a mapping bug.

Checkpoint writers (upstream's own): ``stage2`` and ``vl4m`` are raw ``torch.save(module.state_dict())``
files (the released ``*_stage2.pt`` is a raw state dict, unilm issue #1256) plus the module's three index
tensors under their names, which the released files carry (the #1256 dump; upstream's loader pops them
unconditionally when fine-tuning at another resolution, so its documented 224 -> 384 fine-tuning needs them;
at this commit the module holds them as plain attributes, so ``state_dict()`` alone lacks them). The
fine-tuned fixtures are Lightning checkpoints written by ``Trainer.save_checkpoint`` (what ``run.py``'s
``ModelCheckpoint`` writes), exactly as this commit's module state dict is, without index tensors.

Outputs come from upstream's own methods (``infer``, ``infer_text``, ``infer_image``, ``infer_text_ft``,
``infer_image_ft``, ``infer_text_mlm``) and objectives (``compute_textonly_mlm``, ``compute_mlm``,
``compute_itc``, ``compute_irtr``, ``compute_vqa``, ``compute_nlvr2``) in eval mode; ITM logits are
``itm_score(infer(batch)["cls_feats"])``, the positive-pair half of ``compute_itm_hardneg`` (whose negatives
are sampled at random). Shims (none changes a number):

- ``torch.Tensor.get_device`` returns ``"cpu"`` for CPU tensors while the upstream forward runs: upstream
  moves masks and labels with ``.to(device=t.get_device())``, and ``get_device()`` is ``-1`` on CPU, which
  ``.to`` refuses. Only the placement of tensors already on the CPU is concerned.
- ``module.log`` is a no-op: ``LightningModule.log`` needs a running Trainer loop; logging only.
- a one-process ``gloo`` group (``torch.distributed``) for ``compute_itc``/``compute_irtr``'s ``all_gather``,
  which with one process returns the local tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from torch import nn

VOCAB, TEXT_LEN, TEXT_LEN_INIT, VQA_LABELS = 40, 8, 12, 7
PAD, MASK, CLS, SEP = 0, 1, 2, 3
WIDTH, HEADS, DEPTH, PATCH = 16, 2, 3, 4
STYLES = {"relpos": dict(vl_from=2), "abspos": dict(vl_from=1)}
STAGES = {
    # stage: (image size, loss_names, max_text_len, writer, zoo tags it stands for)
    "stage2": (16, {"textmlm": 1}, TEXT_LEN_INIT, "raw", ("stage2_text",)),
    "vl4m": (16, {"itm": 1, "itc": 1, "mlm": 1}, TEXT_LEN, "raw", ("vl4m",)),
    "irtr": (24, {"irtr": 1}, TEXT_LEN, "lightning", ("vl4m_ft_coco_384", "vl4m_ft_f30k_384")),
    "nlvr2": (24, {"nlvr2": 1}, TEXT_LEN, "lightning", ("vl4m_ft_nlvr2_384",)),
    "vqa": (28, {"vqa": 1}, TEXT_LEN, "lightning", ("vl4m_ft_vqav2_480",)),
}
ARCHS = {"relpos": ("vlmo_base_patch16_224", "vlmo_large_patch16_224"), "abspos": ("vlmo_base_plus_patch16_224",)}
INDEX_NAMES = ("relative_position_index", "text_relative_position_index", "text_imag_relative_position_index")


def _import_upstream(root: Path):
    package_root = root / "vlmo" if (root / "vlmo" / "vlmo").is_dir() else root
    sys.path.insert(0, str(package_root))
    import vlmo.modules.multiway_transformer as mw
    from vlmo.modules import objectives
    from vlmo.modules.vlmo_module import VLMo

    if not Path(mw.__file__).resolve().is_relative_to(package_root.resolve()):
        raise SystemExit(f"vlmo was imported from {mw.__file__}, not from {package_root}")
    from timm.models.registry import register_model

    @register_model
    def vlmo_tiny_relpos_patch4(pretrained=False, **kwargs):  # as vlmo_base_patch16, shrunk
        img_size = kwargs.pop("img_size", 16)
        return mw.MultiWayTransformer(
            img_size=img_size, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=2,
            qkv_bias=True, vlffn_start_layer_index=STYLES["relpos"]["vl_from"],
            norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs,
        )  # fmt: skip

    @register_model
    def vlmo_tiny_abspos_patch4(pretrained=False, **kwargs):  # as vlmo_base_plus_patch16, shrunk
        img_size = kwargs.pop("img_size", 16)
        return mw.MultiWayTransformer(
            img_size=img_size, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=2,
            qkv_bias=True, vlffn_start_layer_index=STYLES["abspos"]["vl_from"], use_abs_pos_emb=True,
            need_relative_position_embed=False, layer_scale_init_values=None,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs,
        )  # fmt: skip

    return VLMo, objectives


def _config(style: str, image_size: int, losses: dict, max_text_len: int, load_path: str = "") -> dict:
    """The config keys ``VLMo.__init__`` and the objectives read (the sacred defaults of ``vlmo/config.py``
    for the rest), drop path 0 (eval numerics)."""
    loss_names = {"itm": 0, "itc": 0, "mlm": 0, "textmlm": 0, "vqa": 0, "nlvr2": 0, "irtr": 0, **losses}
    return dict(
        exp_name=f"tiny_{style}", seed=1, image_size=image_size, model_arch=f"vlmo_tiny_{style}_patch4",
        drop_path_rate=0.0, vocab_size=VOCAB, max_text_len=max_text_len, max_text_len_of_initckpt=TEXT_LEN_INIT,
        loss_names=loss_names, load_path=load_path, test_only=False, vqav2_label_size=VQA_LABELS,
        get_recall_metric=False, tokenizer="bert-base-uncased", whole_word_masking=False, mlm_prob=0.15,
    )  # fmt: skip


def _redraw(module: nn.Module, seed: int) -> int:
    """Re-draw every parameter (see the module docstring); returns how many tensors were drawn."""
    g = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                n = torch.randn(p.shape, generator=g)
                if isinstance(mod, nn.LayerNorm) and name == "weight":
                    value = 1 + 0.1 * n
                elif name.startswith("gamma_"):
                    value = 0.5 + 0.2 * n
                elif p.ndim == 0:  # logit_scale, logit_vl_scale
                    value = math.log(1 / 0.07) + 0.2 * n
                elif isinstance(mod, nn.Embedding) or name in (
                    "cls_token",
                    "pos_embed",
                    "relative_position_bias_table",
                ):
                    value = 0.5 * n
                elif p.ndim == 1:
                    value = 0.1 * n
                else:
                    value = n / math.sqrt(p[0].numel())
                p.copy_(value)
    if len(seen) != len(list(module.parameters())):
        raise AssertionError("some parameters were not re-drawn")
    return len(seen)


def _inputs(image_size: int, text_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Two images (and a second pair for NLVR2) in [-1, 1], two texts: CLS words SEP, the second padded
    after 5 tokens; for stage2 (12 tokens) both are padded from token 8 on (the crop to 8 is then exact)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, image_size, image_size, generator=g) * 2 - 1
    image_1 = torch.rand(2, 3, image_size, image_size, generator=g) * 2 - 1
    ids = torch.randint(SEP + 1, VOCAB, (2, text_len), generator=g)
    ids[:, 0] = CLS
    lengths = [min(text_len, TEXT_LEN), 5]
    for row, length in enumerate(lengths):
        ids[row, length - 1] = SEP
        ids[row, length:] = PAD
    masks = (ids != PAD).long()
    mlm_ids, labels = ids.clone(), torch.full_like(ids, -100)
    for row, positions in enumerate(([2, 4], [1, 3])):
        labels[row, positions] = ids[row, positions]
        mlm_ids[row, positions] = MASK
    return dict(
        image=image, image_1=image_1, text_ids=ids, text_masks=masks, text_ids_mlm=mlm_ids, text_labels_mlm=labels
    )


def _batch(inputs: dict[str, torch.Tensor]) -> dict:
    """The batch dict of upstream's datamodules: images as one-element lists (one transform)."""
    return {
        "image": [inputs["image"]],
        "image_0": [inputs["image"]],
        "image_1": [inputs.get("image_1", inputs["image"])],
        "text_ids": inputs["text_ids"],
        "text_masks": inputs["text_masks"],
        "text_labels": torch.full_like(inputs["text_ids"], -100),
        "text_ids_mlm": inputs["text_ids_mlm"],
        "text_labels_mlm": inputs["text_labels_mlm"],
        "vqa_labels": [[0, 3], [5]],
        "vqa_scores": [[1.0, 0.3], [0.6]],
        "answers": [1, 0],
        "table_name": ["nlvr2_dev", "nlvr2_dev"],
    }


@contextlib.contextmanager
def _cpu_get_device():
    """Shim: ``get_device()`` of a CPU tensor is ``"cpu"`` (upstream passes it to ``.to(device=)``)."""
    original = torch.Tensor.get_device

    def get_device(self):
        return "cpu" if self.device.type == "cpu" else original(self)

    torch.Tensor.get_device = get_device
    try:
        yield
    finally:
        torch.Tensor.get_device = original


def _forward(module, objectives, stage: str, inputs: dict) -> dict[str, torch.Tensor]:
    """Every output upstream computes for this kind of checkpoint (see the README for each name)."""
    batch, out = _batch(inputs), {}
    module.log = lambda *args, **kwargs: None  # shim: LightningModule.log needs a Trainer loop
    with torch.no_grad(), _cpu_get_device():
        if stage == "stage2":
            out["text_feats"] = module.infer_text_mlm(batch, mask_text=False)["text_feats"]
            out["mlm_logits"] = objectives.compute_textonly_mlm(module, batch)["mlm_logits"]
            return out
        if stage in ("vl4m", "resize"):
            image, text = module.infer_image(batch), module.infer_text(batch)
            out.update(image_feats=image["image_feats"], image_embeds=image["cls_feats"])
            out.update(image_vl_embeds=image["cls_vlffn_feats"], text_feats=text["text_feats"])
            out.update(text_embeds=text["cls_feats"], text_vl_embeds=text["cls_vlffn_feats"])
            itc = objectives.compute_itc(module, batch)
            out.update(
                {k: itc[k] for k in ("itc_i2t_logits", "itc_t2i_logits", "itc_logit_scale", "itc_logit_vl_scale")}
            )
            fusion = module.infer(batch)
            out["itm_logits"] = module.itm_score(fusion["cls_feats"])
            out["mlm_logits"] = objectives.compute_mlm(module, batch)["mlm_logits"]
        elif stage == "irtr":
            image, text = module.infer_image_ft(batch), module.infer_text_ft(batch)
            out.update(image_feats=image["image_feats"], image_embeds=image["cls_feats"])
            out.update(text_feats=text["text_feats"], text_embeds=text["cls_feats"])
            irtr = objectives.compute_irtr(module, batch)
            out.update({k: irtr[k] for k in ("irtr_i2t_logits", "irtr_t2i_logits", "irtr_logit_scale")})
            fusion = module.infer(batch)
        elif stage == "vqa":
            out["vqa_logits"] = objectives.compute_vqa(module, batch)["vqa_logits"]
            fusion = module.infer(batch)
        elif stage == "nlvr2":
            out["nlvr2_logits"] = objectives.compute_nlvr2(module, batch)["nlvr2_logits"]
            fusion = module.infer(batch, image_token_type_idx=1)
            second = module.infer(batch, image_token_type_idx=2)
            out.update(fusion_1_text_feats=second["text_feats"], fusion_1_image_feats=second["image_feats"])
            out["fusion_1_cls_feats"] = second["cls_feats"]
        out.update(fusion_text_feats=fusion["text_feats"], fusion_image_feats=fusion["image_feats"])
        out["fusion_cls_feats"] = fusion["cls_feats"]
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _write_checkpoint(module, writer: str, path: Path) -> str:
    if writer == "raw":
        state = module.state_dict()
        if module.relative_position_embed:
            state.update({name: getattr(module, name) for name in INDEX_NAMES})
        torch.save(state, path)
        return (
            "torch.save(module.state_dict() + the three index tensors)"
            if module.relative_position_embed
            else ("torch.save(module.state_dict())")
        )
    import pytorch_lightning as pl

    trainer = pl.Trainer(logger=False, checkpoint_callback=False, progress_bar_refresh_rate=0)
    trainer.training_type_plugin.connect(module)
    trainer.save_checkpoint(str(path))
    return f"pytorch_lightning {pl.__version__} Trainer.save_checkpoint (a Lightning checkpoint, state_dict wrapper)"


def _versions() -> dict[str, str]:
    import pytorch_lightning
    import scipy
    import timm
    import torchmetrics
    import transformers

    return {
        "torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
        "pytorch_lightning": pytorch_lightning.__version__, "torchmetrics": torchmetrics.__version__,
        "scipy": scipy.__version__,
    }  # fmt: skip


OUTPUT_DOCS = {
    "text_feats": "text-only path, final LayerNorm tokens [B, L, D] (``infer_text``/``_ft``/``_mlm``)",
    "image_feats": "image-only path, final LayerNorm tokens [B, 1+P, D] (``infer_image``/``_ft``)",
    "image_embeds": "``itc_image_proj`` of the image CLS, L2-normalised (``cls_feats``)",
    "text_embeds": "``itc_text_proj`` of the text CLS, L2-normalised (``cls_feats``)",
    "image_vl_embeds": "``itc_vl_image_proj`` of the CLS of the path whose top blocks use the VL-FFN",
    "text_vl_embeds": "``itc_vl_text_proj`` likewise (``cls_vlffn_feats``)",
    "itc_i2t_logits": "``compute_itc``: ``logit_scale.exp() * image_embeds @ text_embeds.T``",
    "itc_t2i_logits": "``compute_itc``: its transpose",
    "itc_logit_scale": "``compute_itc``: ``logit_scale.exp()``",
    "itc_logit_vl_scale": "``compute_itc``: ``logit_vl_scale.exp()``",
    "irtr_i2t_logits": "``compute_irtr``: ``logit_scale.exp() * image_embeds @ text_embeds.T``",
    "irtr_t2i_logits": "``compute_irtr``: its transpose",
    "irtr_logit_scale": "``compute_irtr``: ``logit_scale.exp()``",
    "fusion_text_feats": "``infer``: text tokens of the fusion path [B, L, D]",
    "fusion_image_feats": "``infer``: image tokens of the fusion path [B, 1+P, D]",
    "fusion_cls_feats": "``infer``: ``pooler`` of the fusion path (tanh(dense(text CLS)))",
    "fusion_1_text_feats": "``infer(image_token_type_idx=2)`` on the second image: text tokens",
    "fusion_1_image_feats": "the same: image tokens",
    "fusion_1_cls_feats": "the same: pooled",
    "itm_logits": "``itm_score(infer(batch)['cls_feats'])`` [B, 2]",
    "mlm_logits": "``compute_mlm`` (fusion) / ``compute_textonly_mlm`` (stage2) on ``text_ids_mlm`` [B, L, V]",
    "vqa_logits": "``compute_vqa``: ``vqa_classifier(infer(batch)['cls_feats'])`` [B, answers]",
    "nlvr2_logits": "``compute_nlvr2``: ``nlvr2_classifier([pooled(image_0, type 1); pooled(image_1, type 2)])``",
}


def _readme(folder: str, meta: dict, outputs: dict, checkpoint_note: str) -> str:
    lines = [
        f"# {folder}",
        "",
        f"Produced by microsoft/unilm's `vlmo/` code at commit `{meta['commit']}` with `tools/upstream_vlmo.py`:",
        "",
        "    python tools/upstream_vlmo.py /path/to/unilm --commit " + meta["commit"],
        "",
        f"Upstream module: `vlmo.modules.vlmo_module.VLMo(config)` with `config = {json.dumps(meta['config'])}` on the",
        f"backbone `{meta['config']['model_arch']}` (`MultiWayTransformer`, registered by the tool as upstream",
        "registers its own, only the sizes shrunk). Every parameter re-drawn with seeded random values.",
        "",
        f"Stands for the zoo cards: {', '.join(meta['covers_cards'])}.",
        "",
        "Files:",
        "",
        f"- {checkpoint_note}",
        "- `inputs.safetensors`: `image` (and for NLVR2 `image_1`, the second image) [B, 3, H, W] in [-1, 1];",
        "  `text_ids`, `text_masks` [B, L]; `text_ids_mlm` (ids with `[MASK]`=1 at the labelled positions),",
        "  `text_labels_mlm`.",
        "- `outputs.safetensors` (eval mode, fp32), each from upstream's own method:",
        "",
    ]
    lines += [f"  - `{name}` {tuple(value.shape)}: {OUTPUT_DOCS[name]}" for name, value in outputs.items()]
    lines += [
        "",
        "Environment (upstream's dependencies in a separate venv; upstream pins torch 1.8, transformers 4.8.1,",
        "which have no Python 3.11 builds): " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "In transformers 4.30.2, as in 4.8.1, `BertEmbeddings` keeps `position_ids` a persistent buffer (the",
        "checkpoint carries `text_embeddings.position_ids`, as the released files do); `BertEmbeddings` and",
        "`BertPredictionHeadTransform` compute the same functions in both versions.",
        "",
        'Shims (none changes a number): `torch.Tensor.get_device()` returns `"cpu"` for CPU tensors while the',
        "upstream forward runs (upstream calls `.to(device=t.get_device())`, and `-1`, the CPU answer, is",
        "refused by `.to`); `module.log` is a no-op (Lightning's `log` needs a Trainer loop); a one-process",
        "`gloo` group serves `compute_itc`/`compute_irtr`'s `all_gather` (identity with one process).",
        "",
    ]
    return "\n".join(lines)


def _save_fixture(out_dir: Path, folder: str, meta: dict, inputs: dict, outputs: dict, checkpoint_note: str) -> None:
    from safetensors.torch import save_file

    path = out_dir / folder
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(path / "inputs.safetensors"))
    save_file(outputs, str(path / "outputs.safetensors"))
    (path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (path / "README.md").write_text(_readme(folder, meta, outputs, checkpoint_note))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("unilm", type=Path, help="checkout of microsoft/unilm (or of its vlmo/ folder)")
    parser.add_argument("--commit", required=True, help="the checkout's commit (40 hex)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/upstream")
    args = parser.parse_args(argv)
    VLMo, objectives = _import_upstream(args.unilm)
    versions = _versions()

    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        for s, style in enumerate(STYLES):
            for k, (stage, (size, losses, text_len, writer, tags)) in enumerate(STAGES.items()):
                torch.manual_seed(1000 * s + k)
                config = _config(style, size, losses, text_len)
                module = VLMo(config).eval()
                _redraw(module, seed=1000 * s + k)
                folder = f"vlmo_{style}_{stage}"
                name = "checkpoint.pt"
                (args.out / folder).mkdir(parents=True, exist_ok=True)
                note = _write_checkpoint(module, writer, args.out / folder / name)
                inputs = _inputs(size, text_len, seed=1000 * s + k)
                if stage != "nlvr2":
                    del inputs["image_1"]
                outputs = _forward(module, objectives, stage, inputs)
                meta = {
                    "upstream": "microsoft/unilm", "commit": args.commit, "generator": "tools/upstream_vlmo.py",
                    "model": "vlmo.modules.vlmo_module.VLMo", "style": style, "stage": stage,
                    "checkpoint": name, "writer": writer, "config": config, "vl_from": STYLES[style]["vl_from"],
                    "covers_cards": [f"{arch}.{tag}" for arch in ARCHS[style] for tag in tags],
                    "versions": versions,
                }  # fmt: skip
                _save_fixture(args.out, folder, meta, inputs, outputs, f"`{name}`: {note}.")
                print(folder, {k: tuple(v.shape) for k, v in outputs.items()})
            # resize: upstream's own loader puts the vl4m checkpoint into a 24 px model
            source = args.out / f"vlmo_{style}_vl4m" / "checkpoint.pt"
            config = _config(style, 24, STAGES["vl4m"][1], TEXT_LEN, load_path=str(source))
            module = VLMo(config).eval()
            _check_loaded(module, source)
            inputs = _inputs(24, TEXT_LEN, seed=1000 * s + 99)
            del inputs["image_1"]
            outputs = _forward(module, objectives, "resize", inputs)
            config["load_path"] = f"../vlmo_{style}_vl4m/checkpoint.pt"
            meta = {
                "upstream": "microsoft/unilm", "commit": args.commit, "generator": "tools/upstream_vlmo.py",
                "model": "vlmo.modules.vlmo_module.VLMo", "style": style, "stage": "resize",
                "checkpoint": f"../vlmo_{style}_vl4m/checkpoint.pt", "writer": None, "config": config,
                "vl_from": STYLES[style]["vl_from"], "covers_cards": [], "versions": versions,
            }  # fmt: skip
            note = (
                f"no checkpoint of its own: `../vlmo_{style}_vl4m/checkpoint.pt` (16 px) loaded by upstream's "
                "`VLMo.load_pretrained_weight` (`load_path`) into this 24 px model, which resizes "
                + ("the relative position table (geometric-progression `scipy.interpolate.interp2d`, cubic)"
                   if style == "relpos" else "`pos_embed` (`interpolate_pos_embed`, bicubic)")
            )  # fmt: skip
            _save_fixture(args.out, f"vlmo_{style}_resize", meta, inputs, outputs, note)
            print(f"vlmo_{style}_resize", {k: tuple(v.shape) for k, v in outputs.items()})
        dist.destroy_process_group()


def _check_loaded(module: nn.Module, source: Path) -> None:
    """Every parameter of the resized model came from the checkpoint (resized ones excepted)."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    for key, value in module.state_dict().items():
        if key not in state:
            raise AssertionError(f"upstream's loader left {key} at its init")
        if key not in ("relative_position_bias_table", "transformer.pos_embed") and not torch.equal(value, state[key]):
            raise AssertionError(f"upstream's loader changed {key}")


if __name__ == "__main__":
    main()
