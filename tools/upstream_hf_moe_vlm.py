"""Write the fidelity fixtures of the transformers MoE VLM cards (``tests/data/upstream/hf_<model type>/``).

For each family of :mod:`mome.models.hf_moe_vlm`, transformers' own model class is built from the family's tiny
config (:func:`mome.models.hf_moe_vlm.tiny_config`: transformers' config class, tiny sizes), its parameters
re-drawn at random (seeded), and written
by transformers' ``save_pretrained`` into ``model/`` laid out as the released Hub repo is (Qwen3-Omni: the
whole ``Qwen3OmniMoeForConditionalGeneration`` with ``enable_audio_output=False``, so the keys are
``thinker.*`` as in the release); the inputs (:func:`~mome.models.hf_moe_vlm.example_inputs`, two prompts with
one image each) and transformers' own forward outputs (``logits``, each MoE layer's router logits from
``output_router_logits=True``) and 3 greedy tokens from ``generate`` go beside it, with ``meta.json`` (upstream
``huggingface/transformers`` and the release tag of the installed wheel, which records no commit)::

    HF_HUB_OFFLINE=1 python tools/upstream_hf_moe_vlm.py tests/data/upstream

``tests/test_fidelity_hf_moe_vlm.py`` loads each ``model/`` through the zoo card's public route
(``create_model(card, pretrained=True, pretrained_cfg_overlay=dict(file=...))``) and compares.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEED = 0
NEW_TOKENS = 3


def redraw(model: torch.nn.Module) -> torch.nn.Module:
    """Re-draw every parameter (seeded), so that no zero or one of the initialisation hides a wrong mapping:
    vectors (norm scales, biases) ``1 + 0.1 N``, matrices and stacked experts ``N / sqrt(last dim)``."""
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            value = 1 + 0.1 * noise if param.ndim == 1 else noise / param.shape[-1] ** 0.5
            param.copy_(value.to(param.dtype))
    return model


def write_fixture(model_type: str, out: Path) -> Path:
    import transformers

    from mome.models import hf_moe_vlm as H

    folder = out / f"hf_{model_type}"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "model").mkdir(parents=True)
    config = H.tiny_config(model_type)
    torch.manual_seed(SEED)
    if model_type == "qwen3_omni_moe":  # the release is the whole model: its Thinker's keys are thinker.*
        whole_config = transformers.Qwen3OmniMoeConfig(thinker_config=config.to_dict(), enable_audio_output=False)
        whole = redraw(transformers.Qwen3OmniMoeForConditionalGeneration(whole_config).eval())
        whole.save_pretrained(folder / "model")
        model = whole.thinker
    else:
        family = H.FAMILIES[model_type]
        model = redraw(getattr(transformers, family.model_class)(config).eval())
        model.save_pretrained(folder / "model")
    inputs = H.example_inputs(model, batch_size=2, seed=SEED)
    with torch.no_grad():
        output = model(**inputs, output_router_logits=True)
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    outputs = {"logits": output.logits.contiguous(), "generated": generated[:, -NEW_TOKENS:].contiguous()}
    for layer, logits in enumerate(output.router_logits):
        outputs[f"router_logits.{layer}"] = logits.float().contiguous()
    save_file({k: v.contiguous() for k, v in inputs.items()}, folder / "inputs.safetensors")
    save_file(outputs, folder / "outputs.safetensors")
    meta = {
        "upstream": "huggingface/transformers",
        "commit": f"v{transformers.__version__}",
        "generator": "tools/upstream_hf_moe_vlm.py",
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "README.md").write_text(_readme(model_type, model, transformers.__version__))
    return folder


def _readme(model_type: str, model: torch.nn.Module, version: str) -> str:
    whole = "Qwen3OmniMoeForConditionalGeneration (enable_audio_output=False)" if model_type == "qwen3_omni_moe" else ""
    return f"""# hf_{model_type}

A tiny `{type(model).__name__}` written and run by transformers {version} (the PyPI wheel, whose release tag
`v{version}` stands for the commit: the wheel records none; torch {torch.__version__}, CPU, fp32), by:

    HF_HUB_OFFLINE=1 python tools/upstream_hf_moe_vlm.py tests/data/upstream

Config: `mome.models.hf_moe_vlm.tiny_config("{model_type}")` (transformers' config class; 2 language-model layers of
width 32, 4 experts, a one-block vision tower, 32 px images, vocabulary 128). Every parameter re-drawn with seeded
random values (`redraw`: vectors 1 + 0.1 N, matrices and stacked experts N / sqrt(last dim)).

Files:

- `model/`: `save_pretrained` of {whole or f"`{type(model).__name__}`"}: `config.json`, `model.safetensors`
  (and `generation_config.json`), laid out as the released Hub repo.
- `inputs.safetensors`: `mome.models.hf_moe_vlm.example_inputs(model, batch_size=2, seed={SEED})`: two prompts of
  one random image each, with the processor's token types where the family's forward takes them.
- `outputs.safetensors`: `model(**inputs, output_router_logits=True)`: `logits`, `router_logits.<i>` (each MoE
  layer's router logits, transformers' order), and `generated`: {NEW_TOKENS} greedy tokens of `model.generate`.
- `meta.json`: upstream, release tag, generator.
"""


def main(argv: list[str] | None = None) -> int:
    from mome.models import hf_moe_vlm as H

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="tests/data/upstream")
    parser.add_argument("--family", action="append", choices=sorted(H.FAMILIES), help="default: every family")
    args = parser.parse_args(argv)
    for model_type in args.family or sorted(H.FAMILIES):
        print(write_fixture(model_type, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
