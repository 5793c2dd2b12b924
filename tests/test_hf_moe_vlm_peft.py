"""``mome.peft`` (mixtures of LoRA experts) and ``mome.upcycle`` on transformers' MoE VLMs (tiny random configs).

LoRA experts apply to every ``nn.Linear`` the target patterns match: the attention projections, the shared
experts' MLPs, the dense FFN layers, the vision towers. The routed experts of these families are fused parameter
tensors (``gate_up_proj [E, ...]``), not ``nn.Linear`` layers, so a pattern naming them is refused. Sparse
upcycling does not apply: the models are MoE already, and ``mome.upcycle`` takes a timm ViT, an open_clip CLIP or
a causal LM, not a VLM (a typed error)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import mome
from mome.peft import LoRAExpertsConfig, LoRAExpertsLinear, add_lora_experts, lora_experts_layers

pytest.importorskip("peft")
pytest.importorskip("transformers")
from mome.models import hf_moe_vlm as H  # noqa: E402

FAMILIES = sorted(H.FAMILIES)
PATTERN = r".*language_model\..*self_attn\.(q_proj|v_proj)"  # the language model's query and value projections


def _tiny(model_type):
    torch.manual_seed(0)
    return mome.create_model(f"{model_type}_tiny")


def _logits(model, inputs):
    return model(**inputs).logits


@pytest.mark.parametrize("model_type", FAMILIES)
def test_lora_experts_adapt_the_matched_layers_and_only_they_train(model_type):
    model = _tiny(model_type)
    inputs = H.example_inputs(model)
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(PATTERN, n)]
    with torch.no_grad():
        base = _logits(model, inputs)
    targets = add_lora_experts(model, LoRAExpertsConfig(PATTERN, r=2, num_experts=3, top_k=2))
    assert targets == sorted(expected) and len(targets) == 4  # 2 layers x (q, v)
    assert set(lora_experts_layers(model)) == set(targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = r"\.(lora_A|lora_B|router\.proj\.weight)$"
    assert trainable and all(re.search(adapter, n) for n in trainable)
    assert {re.sub(adapter, "", n) for n in trainable} == set(targets)  # every adapted layer, nothing else
    with torch.no_grad():  # B = 0 at init (peft's default): the adapted model starts as the base model
        assert torch.equal(_logits(model, inputs), base)
    for layer in lora_experts_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    logits = _logits(model, inputs)
    assert not torch.allclose(logits, base)
    logits.square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and grads <= trainable
    stats = mome.routing_stats(model)  # the LoRA experts' routing, recorded like mome's own MoE layers
    assert set(targets) <= set(stats)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_routed_experts_are_fused_tensors_not_linear_layers(model_type):
    model = _tiny(model_type)
    with pytest.raises(mome.UnsupportedModelError, match="not an nn.Linear layer"):
        add_lora_experts(model, LoRAExpertsConfig(r".*\.experts", r=2, num_experts=2))
    assert not any(isinstance(m, LoRAExpertsLinear) for m in model.modules())  # nothing half-replaced


@pytest.mark.parametrize("model_type", ["glm4v_moe", "llama4"])
def test_lora_experts_on_the_shared_experts_beside_the_routing_capture(model_type):
    """The shared experts' MLPs (GLM-4.5V, Llama 4) are nn.Linear: adapted, and the family's own router is still
    captured by mome's hooks in the same forward."""
    model = _tiny(model_type)
    targets = add_lora_experts(model, LoRAExpertsConfig(r".*shared_experts?\.(gate|up)_proj", r=2, num_experts=2))
    assert targets and all("shared_expert" in t for t in targets)
    with torch.no_grad(), H.routing_capture(model):
        model(**H.example_inputs(model))
        stats = mome.routing_stats(model)
    routers = set(H.router_taps(model))
    assert set(targets) <= set(stats) and {f"{name}.routing" for name in routers} <= set(stats)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_sparse_upcycling_does_not_apply(model_type):
    with pytest.raises(mome.UnsupportedModelError, match="cannot upcycle a .*ForConditionalGeneration"):
        mome.upcycle(_tiny(model_type), num_experts=4)
