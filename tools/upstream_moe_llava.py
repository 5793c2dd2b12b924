"""Write MoE-LLaVA fidelity fixtures (tests/data/upstream/moe_llava_<family>/) with PKU-YuanGroup/MoE-LLaVA's code.

Run in a scratch environment that has the upstream's pinned DeepSpeed (0.9.5, ``DS_BUILD_OPS=0``) and
transformers (4.37.0), not mome's::

    python3.11 -m venv /work/scratch/llava-venv
    /work/scratch/llava-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    DS_BUILD_OPS=0 /work/scratch/llava-venv/bin/pip install deepspeed==0.9.5 transformers==4.37.0 \
        tokenizers==0.15.1 accelerate==0.21.0 einops==0.6.1 einops-exts==0.0.4 timm==0.6.13 "numpy<2" \
        safetensors sentencepiece tiktoken pillow requests shortuuid
    /work/scratch/llava-venv/bin/python tools/upstream_moe_llava.py /path/to/MoE-LLaVA tests/data/upstream

Nothing of the upstream is copied: the script imports the checkout given as its first argument. Per LLM
family (``phi``: MoE-LLaVA-Phi2, ``stablelm``: MoE-LLaVA-StableLM, ``qwen``: MoE-LLaVA-Qwen) it follows the
upstream's three training stages with tiny random models, using the upstream's classes and writers:

1. a tiny ``CLIPVisionModel`` (transformers, every parameter re-drawn) saved as ``openai/tiny-clip`` in a
   scratch working directory: ``build_image_tower`` accepts names starting with ``openai`` and
   ``from_pretrained`` reads that relative folder (no download, no shim);
2. stage I: ``Llava<Family>ForCausalLM(config)`` + ``initialize_vision_modules`` (CLIP tower,
   ``mlp2x_gelu`` projector), projector re-drawn, written by ``moellava.train.train.
   safe_save_model_for_hf_trainer`` with ``tune_mm_mlp_adapter=True`` -> ``stage1/mm_projector.bin``
   (+ its ``config.json``);
3. stage II: ``Llava<Family>ForCausalLM`` + ``initialize_vision_modules(pretrain_mm_mlp_adapter=
   stage1/mm_projector.bin)``, every non-tower parameter re-drawn, ``save_pretrained`` -> ``stage2/``;
4. stage III: ``MoELLaVA<Family>ForCausalLM.from_pretrained(stage2)`` + ``initialize_moe_modules`` (4 experts,
   top-2, ``moe_mode="sparse"``, capacity 1.5, eval capacity 2.0, min capacity 0: the upstream defaults and
   scripts), every non-tower parameter re-drawn, ``save_pretrained`` -> ``moe/``.

Outputs are computed by the upstream evaluation path (``moellava.model.builder.load_pretrained_model``'s
steps, in fp32 on CPU instead of its fp16 on GPU): ``EvalMoELLaVA<Family>ForCausalLM.from_pretrained(moe)``
(``Llava<Family>ForCausalLM`` for stage II) and ``image_tower.load_model()``, then ``forward(input_ids,
images=...)`` and ``generate(..., do_sample=False)``. DeepSpeed 0.9.5's ``top2gating`` draws Gumbel noise for
the second expert also at evaluation, from torch's global generator: every run starts from
``torch.manual_seed(RUN_SEED)``, which the fixture records. DeepSpeed runs on CPU in a one-process gloo group.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=4,
    hidden_act="quick_gelu",
    projection_dim=32,
    layer_norm_eps=1e-5,
)
VOCAB = 96  # the placeholder id of mome's model is VOCAB - 1, never used as text here
WIDTH, HEADS, LAYERS, FFN = 32, 2, 4, 64
NUM_EXPERTS, TOP_K = 4, 2
RUN_SEED = 1234
MAX_NEW_TOKENS = 4
IMAGE_TOKEN_INDEX = -200
#: eval-time capacity variants run on the same MoE checkpoint (DeepSpeed drops assignments under them)
DROP_VARIANTS = {
    "phi": dict(eval_capacity_factor=0.5, min_capacity=0),
    "stablelm": dict(eval_capacity_factor=0.5, min_capacity=20),
    "qwen": dict(eval_capacity_factor=0.25, min_capacity=4),
}


def family_spec(family: str) -> dict:
    """Upstream classes and the tiny LLM config of one family (sizes shrunk; the rest as the released configs)."""
    common = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if family == "phi":
        from moellava.model.language_model import llava_phi as dense
        from moellava.model.language_model import llava_phi_moe as moe

        llm = dict(
            **common,
            **ids,
            intermediate_size=FFN,
            num_key_value_heads=HEADS,
            hidden_act="gelu_new",
            max_position_embeddings=2048,
            layer_norm_eps=1e-5,
            partial_rotary_factor=0.4,
            rope_theta=10000.0,
            resid_pdrop=0.1,
            embd_pdrop=0.0,
            attention_dropout=0.0,
            qk_layernorm=False,
        )
        return dict(
            dense=dense.LlavaPhiForCausalLM,
            dense_config=dense.LlavaPhiConfig,
            moe=moe.MoELLaVAPhiForCausalLM,
            moe_config=moe.MoELLaVAPhiConfig,
            eval=moe.EvalMoELLaVAPhiForCausalLM,
            llm=llm,
        )
    if family == "stablelm":
        from moellava.model.language_model import llava_stablelm as dense
        from moellava.model.language_model import llava_stablelm_moe as moe

        llm = dict(
            **common,
            **ids,
            intermediate_size=FFN,
            num_key_value_heads=HEADS,
            hidden_act="silu",
            rope_pct=0.25,
            rope_theta=10000,
            max_position_embeddings=4096,
            norm_eps=1e-5,
            use_qkv_bias=True,
        )
        return dict(
            dense=dense.LlavaStablelmForCausalLM,
            dense_config=dense.LlavaStablelmConfig,
            moe=moe.MoELLaVAStablelmForCausalLM,
            moe_config=moe.MoELLaVAStablelmConfig,
            eval=moe.EvalMoELLaVAStablelmForCausalLM,
            llm=llm,
        )
    if family == "qwen":
        from moellava.model.language_model import llava_qwen as dense
        from moellava.model.language_model import llava_qwen_moe as moe

        llm = dict(
            **common,
            **ids,
            kv_channels=WIDTH // HEADS,
            intermediate_size=2 * FFN,  # Qwen v1 halves it: each of w1, w2 has FFN outputs
            layer_norm_epsilon=1e-6,
            rotary_pct=1.0,
            rotary_emb_base=10000,
            seq_length=8192,
            max_position_embeddings=8192,
            use_dynamic_ntk=True,
            use_logn_attn=True,
            use_flash_attn=False,
            no_bias=True,
            fp32=True,
        )
        return dict(
            dense=dense.LlavaQWenForCausalLM,
            dense_config=dense.LlavaQWenConfig,
            moe=moe.MoELLaVAQWenForCausalLM,
            moe_config=moe.MoELLaVAQWenConfig,
            eval=moe.EvalMoELLaVAQWenForCausalLM,
            llm=llm,
        )
    raise ValueError(family)


def redraw(module: torch.nn.Module, generator: torch.Generator, skip: tuple[str, ...] = ()) -> None:
    """Re-draw every parameter (no zero/one init survives): norm scales 1 + 0.1 N, other vectors 0.1 N,
    embeddings 0.5 N, matrices N / sqrt(fan_in) (times 2 for the MoE gate, so routing is not uniform)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in skip):
                continue
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            leaf = name.rsplit(".", 2)
            if p.ndim == 1 and name.endswith("weight") and ("norm" in name or ".ln_" in name or "ln_f" in name):
                value = 1.0 + 0.1 * noise
            elif p.ndim == 1:
                value = (0.1 if name.endswith("bias") else 0.5) * noise
            elif "embed" in name or "wte" in name or leaf[-2] == "embedding":
                value = 0.5 * noise
            else:
                fan_in = p[0].numel()
                value = noise / fan_in**0.5 * (2.0 if "gate.wg" in name else 1.0)
            p.copy_(value.to(p.dtype))


def model_args(**overrides) -> SimpleNamespace:
    """The fields of upstream train.py's ModelArguments that initialize_vision_modules / initialize_moe_modules read."""
    args = dict(
        image_tower="openai/tiny-clip",
        video_tower=None,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None,
        image_projector_type="mlp2x_gelu",
        video_projector_type="linear",
        video_global_proj=False,
        video_temproal_proj=False,
        video_spatial_proj=False,
        moe_enable=True,
        train_modules=[],
        moe_mode="sparse",
        moe_layers_idx=None,
        ep_size=1,
        num_experts=[NUM_EXPERTS],
        top_k_experts=TOP_K,
        capacity_factor=1.5,
        eval_capacity_factor=2.0,
        min_capacity=0,
        use_residual=False,
        router_aux_loss_coef=0.01,
    )
    args.update(overrides)
    return SimpleNamespace(**args)


def mark_multimodal(config) -> None:
    """The config fields upstream train.py sets after initialize_vision_modules (none changes numerics here)."""
    config.image_aspect_ratio = "pad"
    config.tokenizer_padding_side = "right"
    config.mm_use_im_start_end = False
    config.mm_use_im_patch_token = False
    config.mm_projector_lr = None
    config.freeze_mm_mlp_adapter = False


def make_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Two prompts of equal spliced length (no padding): sample 0 holds two images, sample 1 one image.

    ``input_ids`` use upstream's single ``-200`` per image; ``images`` are in prompt order."""
    num_patches = (VISION["image_size"] // VISION["patch_size"]) ** 2
    text = torch.randint(3, VOCAB - 1, (40,), generator=generator)
    first = [1, *text[:3].tolist(), IMAGE_TOKEN_INDEX, *text[3:5].tolist(), IMAGE_TOKEN_INDEX, *text[5:8].tolist()]
    n_second = len(first) - 2 + 2 * num_patches - num_patches - 1  # same spliced length with one image
    rest = text[8 : 8 + n_second].tolist()
    second = [1, *rest[:6], IMAGE_TOKEN_INDEX, *rest[6:]]
    assert len(first) - 2 + 2 * num_patches == len(second) - 1 + num_patches
    width = max(len(first), len(second))
    ids = torch.full((2, width), 0, dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for row, seq in enumerate((first, second)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    images = torch.randn(3, 3, VISION["image_size"], VISION["image_size"], generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "images": images}


class RoutingRecorder:
    """Forward hooks on each DeepSpeed MoE gate: router logits (``gate.wg``), and from ``TopKGate``'s output the
    combine weights summed over capacity slots ``[S, E]`` and ``l_aux``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.records: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        for name, module in model.named_modules():
            if name.endswith("deepspeed_moe.gate"):
                layer = name.split(".")[-4]  # ...layers.<i>.mlp.deepspeed_moe.gate / ...h.<i>.mlp...
                self.handles.append(module.wg.register_forward_hook(self._hook(f"router_logits.{layer}")))
                self.handles.append(module.register_forward_hook(self._gate_hook(layer)))

    def _hook(self, key):
        def hook(module, args, output):
            self.records.setdefault(key, []).append(output.detach().clone())

        return hook

    def _gate_hook(self, layer):
        def hook(module, args, output):
            l_aux, combine_weights, dispatch_mask, exp_counts = output
            self.records.setdefault(f"combine_weights.{layer}", []).append(combine_weights.sum(-1).detach().clone())
            self.records.setdefault(f"l_aux.{layer}", []).append(l_aux.detach().reshape(()).clone())

        return hook

    def first_call(self) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.records.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def load_for_eval(cls, folder: Path, **config_overrides):
    """moellava.model.builder.load_pretrained_model's steps for a local folder, in fp32: from_pretrained, then
    the CLIP tower's load_model (the tower is not built by from_pretrained: delay_load)."""
    if config_overrides:
        config = cls.config_class.from_pretrained(folder)
        config.moe.update(config_overrides)
        model = cls.from_pretrained(folder, config=config, low_cpu_mem_usage=True, torch_dtype=torch.float32)
    else:
        model = cls.from_pretrained(folder, low_cpu_mem_usage=True, torch_dtype=torch.float32)
    tower = model.get_image_tower()
    if not tower.is_loaded:
        tower.load_model()
    return model.eval()


def run(model, inputs, record_routing: bool) -> dict[str, torch.Tensor]:
    """Forward (logits, routing of that pass) and greedy generation, each from torch.manual_seed(RUN_SEED)."""
    out: dict[str, torch.Tensor] = {}
    recorder = RoutingRecorder(model) if record_routing else None
    with torch.no_grad():
        torch.manual_seed(RUN_SEED)
        result = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            images=inputs["images"],
            return_dict=True,
        )
        out["logits"] = result.logits.float()
        if recorder is not None:
            out.update(recorder.first_call())
            recorder.remove()
        image_features = model.encode_images(inputs["images"])
        out["image_features"] = image_features.float()
        # One prompt at a time: upstream's decode steps rebuild the attention mask from the unspliced
        # (right-padded) ids, which misplaces padding in a batch whose prompts differ in length.
        generated = []
        for row in range(inputs["input_ids"].shape[0]):
            keep = inputs["attention_mask"][row].bool()
            ids = inputs["input_ids"][row, keep].unsqueeze(0)
            first = int((inputs["input_ids"][:row] == IMAGE_TOKEN_INDEX).sum())
            count = int((ids == IMAGE_TOKEN_INDEX).sum())
            torch.manual_seed(RUN_SEED)
            tokens = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                images=inputs["images"][first : first + count],
                do_sample=False,
                num_beams=1,
                max_new_tokens=MAX_NEW_TOKENS,
                min_new_tokens=MAX_NEW_TOKENS,
                use_cache=True,
                pad_token_id=0,
            )
            generated.append(tokens[0, -MAX_NEW_TOKENS:])
        out["generated"] = torch.stack(generated)
    return {k: v.contiguous() for k, v in out.items()}


def build_family(family: str, out_dir: Path, seed: int) -> dict:
    from moellava.train.train import safe_save_model_for_hf_trainer
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    spec = family_spec(family)
    generator = torch.Generator().manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)

    # The CLIP tower (a stand-in for openai/clip-vit-large-patch14-336, loaded by the upstream's CLIPVisionTower).
    tower_dir = Path("openai/tiny-clip")
    if tower_dir.exists():
        shutil.rmtree(tower_dir)
    clip = CLIPVisionModel(CLIPVisionConfig(**VISION))
    redraw(clip, generator)
    clip.save_pretrained(tower_dir)
    size = VISION["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        tower_dir
    )

    # Stage I: the projector, saved as upstream's pretraining does (mm_projector.bin + config.json).
    stage1 = spec["dense"](spec["dense_config"](**spec["llm"]))
    stage1.get_model().initialize_vision_modules(model_args=model_args())
    mark_multimodal(stage1.config)
    stage1.config.tune_mm_mlp_adapter = True
    redraw(stage1.get_model().mm_projector, generator)
    trainer = SimpleNamespace(
        args=SimpleNamespace(tune_mm_mlp_adapter=True, use_im_start_end=False, local_rank=-1), model=stage1
    )
    stage1_dir = out_dir / "stage1"
    stage1_dir.mkdir(exist_ok=True)
    safe_save_model_for_hf_trainer(trainer=trainer, output_dir=str(stage1_dir))
    features = torch.randn(2, (size // VISION["patch_size"]) ** 2, VISION["hidden_size"], generator=generator)
    with torch.no_grad():
        projected = stage1.get_model().mm_projector.forward_image(features)
    save_file(
        {"image_tower_features": features.contiguous(), "projected": projected.contiguous()},
        out_dir / "stage1_outputs.safetensors",
    )

    # Stage II: dense LLaVA fine-tuned from the stage-I projector; every non-tower parameter re-drawn.
    stage2 = spec["dense"](spec["dense_config"](**spec["llm"]))
    stage2.get_model().initialize_vision_modules(
        model_args=model_args(pretrain_mm_mlp_adapter=str(stage1_dir / "mm_projector.bin"))
    )
    mark_multimodal(stage2.config)
    stage2.config.tune_mm_mlp_adapter = False
    redraw(stage2, generator, skip=("image_tower",))
    stage2_dir = out_dir / "stage2"
    stage2.save_pretrained(stage2_dir)

    # Stage III: MoE-tuning from the stage-II folder (upcycled), then every non-tower parameter re-drawn.
    moe = spec["moe"].from_pretrained(stage2_dir, torch_dtype=torch.float32)
    moe.get_model().initialize_vision_modules(model_args=model_args())
    moe.initialize_moe_modules(model_args=model_args())
    redraw(moe, generator, skip=("image_tower",))
    moe_dir = out_dir / "moe"
    moe.save_pretrained(moe_dir)

    inputs = make_inputs(generator)
    save_file(inputs, out_dir / "inputs.safetensors")
    dense_model = load_for_eval(spec["dense"], stage2_dir)
    save_file(run(dense_model, inputs, record_routing=False), out_dir / "stage2_outputs.safetensors")
    eval_model = load_for_eval(spec["eval"], moe_dir)
    save_file(run(eval_model, inputs, record_routing=True), out_dir / "moe_outputs.safetensors")
    drop = DROP_VARIANTS[family]
    drop_model = load_for_eval(spec["eval"], moe_dir, **drop)
    save_file(run(drop_model, inputs, record_routing=True), out_dir / "moe_drop_outputs.safetensors")
    # The weights of the tower live in the checkpoints; the scratch tower folder is not part of the fixture.
    config = json.loads((moe_dir / "config.json").read_text())
    return dict(seed=seed, run_seed=RUN_SEED, drop_variant=drop, config=config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", type=Path, help="a checkout of PKU-YuanGroup/MoE-LLaVA")
    parser.add_argument("out", type=Path, help="tests/data/upstream (folders moe_llava_<family> are written)")
    parser.add_argument("--families", nargs="+", default=["phi", "stablelm", "qwen"])
    parser.add_argument("--commit", default=None, help="the checkout's commit (default: git rev-parse)")
    args = parser.parse_args(argv)
    upstream = args.upstream.resolve()
    commit = (
        args.commit
        or subprocess.run(
            ["git", "-C", str(upstream), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    out = args.out.resolve()
    sys.path.insert(0, str(upstream))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="moe_llava_upstream_"))
    os.chdir(work)  # build_image_tower resolves "openai/tiny-clip" relative to the working directory
    for index, family in enumerate(args.families):
        folder = out / f"moe_llava_{family}"
        if folder.exists():
            for sub in ("stage1", "stage2", "moe"):
                shutil.rmtree(folder / sub, ignore_errors=True)
        info = build_family(family, folder, seed=100 + index)
        meta = {"upstream": "PKU-YuanGroup/MoE-LLaVA", "commit": commit, "generator": "tools/upstream_moe_llava.py"}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        versions = {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "deepspeed": deepspeed.__version__,
        }
        (folder / "generation.json").write_text(json.dumps({**info, "versions": versions}, indent=2) + "\n")
        print(f"wrote {folder}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
