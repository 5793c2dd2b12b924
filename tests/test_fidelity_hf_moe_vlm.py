"""transformers' MoE VLM cards against outputs transformers itself produced (tests/data/upstream/hf_<model type>/).

Each fixture holds a tiny model of one family written by transformers' ``save_pretrained`` in the layout of the
released Hub repo (Qwen3-Omni: the whole model, ``thinker.*`` keys), the inputs (two prompts of one image each)
and transformers' forward outputs: logits, each MoE layer's router logits and 3 greedy tokens
(``tools/upstream_hf_moe_vlm.py``; see each folder's README). Every model is loaded through the zoo card's
public route, ``create_model(card, pretrained=True, pretrained_cfg_overlay=dict(file=<fixture>/model))``: the
card's format (``transformers``: the family class's own ``from_pretrained``, no converter), its family and, for
Qwen3-Omni, the Thinker taken out of the whole model. Diffs are absolute; generated tokens count as a diff of 0
when all agree.

Not covered: the released full-size configs and weights (not downloadable here), bf16.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from fidelity import FidelityCase, fixture_dir, fixture_meta, max_abs_diff
from safetensors.torch import load_file

import mome

pytest.importorskip("transformers")

#: model type -> the zoo card its fixture covers
CARDS = {
    "qwen3_vl_moe": "qwen3_vl_moe_30b_a3b.instruct",
    "ernie4_5_vl_moe": "ernie4_5_vl_moe_28b_a3b.pt",
    "glm4v_moe": "glm4_5v_106b_a12b.chat",
    "llama4": "llama4_scout_17b_16e.instruct",
    "aria": "aria_25b_a3_9b.chat",
    "qwen3_omni_moe": "qwen3_omni_moe_30b_a3b.instruct",
}
NEW_TOKENS = 3


def load_card(model_type: str) -> torch.nn.Module:
    folder = fixture_dir(f"hf_{model_type}") / "model"
    return mome.create_model(CARDS[model_type], pretrained=True, pretrained_cfg_overlay=dict(file=str(folder)))


def compare(model_type: str) -> dict[str, float]:
    folder = fixture_dir(f"hf_{model_type}")
    inputs = load_file(folder / "inputs.safetensors")
    expected = load_file(folder / "outputs.safetensors")
    model = load_card(model_type)
    with torch.no_grad():
        output = model(**inputs, output_router_logits=True)
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, -NEW_TOKENS:]
    diffs = {"logits": max_abs_diff(output.logits, expected["logits"])}
    routers = sorted(k for k in expected if k.startswith("router_logits."))
    assert len(routers) == len(output.router_logits) > 0
    for layer, logits in enumerate(output.router_logits):
        diffs[f"router_logits.{layer}"] = max_abs_diff(logits.float(), expected[f"router_logits.{layer}"])
    diffs["generated"] = 0.0 if torch.equal(generated, expected["generated"]) else float("inf")
    return diffs


CASES = [
    FidelityCase(
        f"transformers {model_type} -> {card} (card route, from_pretrained), fp32",
        f"hf_{model_type}",
        partial(compare, model_type),
        cards=(card,),
    )
    for model_type, card in CARDS.items()
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fidelity(case):
    case.check()


def test_fixtures_name_the_upstream_and_cover_every_transformers_card():
    shipped = {p.stem for p in mome.zoo_dir().glob("*.yaml") if "source_format: transformers" in p.read_text()}
    assert shipped == set(CARDS.values())
    for model_type in CARDS:
        meta = fixture_meta(f"hf_{model_type}")
        assert meta["upstream"] == "huggingface/transformers" and meta["generator"] == "tools/upstream_hf_moe_vlm.py"


def test_the_omni_card_builds_the_thinker_out_of_the_whole_model():
    model = load_card("qwen3_omni_moe")
    assert type(model).__name__ == "Qwen3OmniMoeThinkerForConditionalGeneration"
    keys = load_file(fixture_dir("hf_qwen3_omni_moe") / "model" / "model.safetensors").keys()
    assert all(k.startswith("thinker.") for k in keys)  # the release's layout: a Thinker alone would not load it
