"""transformers' multimodal MoE models through mome's registry (:mod:`mome.models.hf_moe_vlm`): the tiny random
configs load by name offline, generate with the KV cache, and their captured routing matches a count made
independently from the model's own ``output_router_logits``, per modality."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import mome

pytest.importorskip("transformers")
from mome.models import hf_moe_vlm as H  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import hf_routing_overhead as overhead  # noqa: E402

FAMILIES = sorted(H.FAMILIES)
IMAGE, TEXT = 0, 1
TINY_IMAGE_ID = 100  # the tiny configs' image placeholder


@pytest.fixture(scope="module")
def models():
    built = {}
    for model_type in FAMILIES:
        torch.manual_seed(0)
        built[model_type] = mome.create_model(f"{model_type}_tiny")
    return built


def test_the_families_register_lazily_and_list():
    names = mome.list_models()
    assert {f"{t}_tiny" for t in FAMILIES} <= set(names)
    assert {"qwen3_vl_moe_30b_a3b", "glm4_5v_106b_a12b", "llama4_scout_17b_16e"} <= set(names)


def _greedy_without_cache(model, inputs, steps):
    """Greedy decoding by full forward passes (no cache), the token types extended as text."""
    inputs = dict(inputs)
    ids = inputs["input_ids"]
    for _ in range(steps):
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], 1)
        inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
        for key in ("mm_token_type_ids", "moe_mm_token_type_ids"):
            if key in inputs:
                inputs[key] = torch.cat([inputs[key], torch.zeros_like(token)], 1)
    return ids


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generate_with_the_kv_cache_equals_uncached_greedy_decoding(models, model_type, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = models[model_type]
    inputs = H.example_inputs(model)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=True)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 3
    assert torch.equal(cached, _greedy_without_cache(model, inputs, 3))


def _direct_loads(model, inputs, modality):
    """``[(per-modality load [M, E], load [E])]`` per router record, counted from the model's own
    ``output_router_logits`` (top-k of the logits: every tiny router's choice, their correction biases being 0)
    with the given token modality ``[B * T]``."""
    family = H.family_of(model)
    with torch.no_grad():
        router_logits = model(**inputs, output_router_logits=True).router_logits
    top_k = next(iter(H.router_taps(model).values())).module.top_k
    found = []
    for logits in router_logits:
        logits = logits.reshape(modality.shape[0], -1)
        subsets = [None]
        if family.model_type == "ernie4_5_vl_moe":  # text experts route the text tokens, vision experts the rest
            vision = inputs["moe_mm_token_type_ids"].reshape(-1).bool()
            subsets = [~vision, vision]
        for subset in subsets:
            rows, mods = (logits, modality) if subset is None else (logits[subset], modality[subset])
            index = rows.topk(top_k, dim=-1).indices
            counts = torch.zeros(family.num_modalities, rows.shape[-1])
            counts.index_put_((mods.repeat_interleave(top_k), index.reshape(-1)), torch.ones(index.numel()), True)
            per_modality = counts / counts.sum(-1, keepdim=True).clamp_min(1)
            found.append((per_modality, counts.sum(0) / counts.sum()))
    return found


def _independent_modality(inputs):
    """Image where the token is the tiny configs' image placeholder, else text: counted without mome's code."""
    ids = inputs["input_ids"].reshape(-1)
    return torch.where(ids == TINY_IMAGE_ID, IMAGE, TEXT)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_routing_stats_per_modality_match_a_direct_count(models, model_type):
    model = models[model_type]
    inputs = H.example_inputs(model, batch_size=2)
    with torch.no_grad(), H.routing_capture(model):
        model(**inputs)
        stats = mome.routing_stats(model)
    direct = _direct_loads(model, inputs, _independent_modality(inputs))
    assert stats and len(stats) == len(direct)
    for (name, values), (per_modality, load) in zip(stats.items(), direct, strict=True):
        captured = values["expert_load_per_modality"]
        assert captured.shape == per_modality.shape, name
        seen = per_modality.sum(-1) > 0
        assert torch.allclose(captured.sum(-1)[seen], torch.ones(int(seen.sum()))), name  # each present modality: 1
        assert torch.allclose(captured, per_modality, atol=1e-6), name
        assert torch.allclose(values["expert_load"], load, atol=1e-6), name
        assert values["expert_load"].sum().item() == pytest.approx(1.0, abs=1e-6)
    # a mix-up (image tokens counted as text) gives another report: the comparison above would fail
    all_text = torch.full_like(_independent_modality(inputs), TEXT)
    mixed = _direct_loads(model, inputs, all_text)
    assert any(
        not torch.allclose(values["expert_load_per_modality"], per_modality, atol=1e-6)
        for values, (per_modality, _) in zip(stats.values(), mixed, strict=True)
    )


def test_captured_statistics_are_computed_when_read_and_follow_the_last_call(models):
    """The capture keeps each call's routing and computes its statistics on the first read: a read returns the
    statistics of the last call, the same as an eager ``routing_statistics`` of that call's routing."""
    from mome.layers.moe import routing_statistics

    model = models["qwen3_vl_moe"]
    first, second = H.example_inputs(model, batch_size=1), H.example_inputs(model, batch_size=2)
    with torch.no_grad(), H.routing_capture(model) as capture:
        model(**first)
        model(**second)
        records = list(capture.records.values())
        assert all(record._pending is not None for record in records)  # nothing computed yet
        stats = mome.routing_stats(model)
        for record, values in zip(records, stats.values(), strict=True):
            routing = record.last_routing
            assert routing.expert_index.shape[0] == second["input_ids"].numel()  # the last call's tokens
            requested = torch.tensor(float(routing.expert_index.numel()))
            eager = routing_statistics(routing, requested, record.num_modalities)
            assert values.keys() == eager.keys()
            assert all(torch.equal(values[key], eager[key]) for key in eager)
        assert mome.routing_stats(model).keys() == stats.keys()  # a second read: the same record, no recompute
        assert all(record._pending is None for record in records)


@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "ernie4_5_vl_moe"])
def test_the_processor_token_types_give_the_modality(models, model_type):
    """``mm_token_type_ids`` (the processor's 0 text / 1 image) decide; marking the image as text moves its
    tokens to the text row of the report."""
    model = models[model_type]
    inputs = H.example_inputs(model)
    with torch.no_grad(), H.routing_capture(model):
        model(**inputs)
        right = mome.routing_stats(model)
        ids = H.modality_ids(model, inputs["input_ids"], torch.zeros_like(inputs["input_ids"]))
        assert (ids == TEXT).all()
    image_rows = [v["expert_load_per_modality"][IMAGE].sum().item() for v in right.values()]
    assert max(image_rows) == pytest.approx(1.0)


def test_capture_is_off_unless_asked_and_leaves_no_hook(models):
    model = models["qwen3_vl_moe"]
    routers = [tap.module for tap in H.router_taps(model).values()]
    before = [len(r._forward_hooks) for r in routers], len(model._forward_pre_hooks)
    with torch.no_grad():
        model(**H.example_inputs(model))
    assert mome.routing_stats(model) == {}
    handle = H.enable_routing_capture(model)
    assert all(len(r._forward_hooks) == n + 1 for r, n in zip(routers, before[0], strict=True))
    handle.remove()
    assert ([len(r._forward_hooks) for r in routers], len(model._forward_pre_hooks)) == before
    assert mome.routing_stats(model) == {} and not any("routing" in n for n, _ in model.named_modules())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_set_top_k_routes_fewer_experts(models, model_type):
    model = models[model_type]
    inputs = H.example_inputs(model)
    previous = H.set_top_k(model, 1)
    try:
        with torch.no_grad(), H.routing_capture(model) as capture:
            model(**inputs)
            assert all(r.last_routing.expert_index.shape[-1] == 1 for r in capture.records.values())
    finally:
        H.set_top_k(model, previous)
    with pytest.raises(mome.InvalidArgumentError, match="top_k"):
        H.set_top_k(model, 99)


def test_bad_input_gives_one_line_typed_errors(monkeypatch):
    with pytest.raises(mome.UnsupportedModelError, match="'deepseek_vl' is not a transformers MoE VLM"):
        H.tiny_config("deepseek_vl")
    missing = H.HFMoEFamily(**{**vars(H.FAMILIES["aria"]), "model_class": "AriaNotInThisVersion"})
    monkeypatch.setitem(H.FAMILIES, "aria", missing)
    with pytest.raises(mome.UnsupportedModelError, match=r"aria_tiny: the installed transformers .* no AriaNotInThis"):
        mome.create_model("aria_tiny")


def test_a_released_model_offline_and_not_cached_names_its_card_repo_and_revision(monkeypatch, tmp_path):
    """A released name builds from its zoo card (tests/test_hf_moe_vlm_cards.py covers the cards)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for pretrained, what in ((False, "config.json"), (True, "weights")):
        with pytest.raises(
            mome.PretrainedUnavailableError,
            match=f"^glm4_5v_106b_a12b.chat: its {what} .* zai-org/GLM-4.5V at revision main",
        ):
            mome.create_model("glm4_5v_106b_a12b", pretrained=pretrained, cache_dir=tmp_path)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_capture_runs_no_tensor_operation_in_the_forward(models, model_type):
    """The hooks keep references only: a forward with the capture on dispatches exactly the aten operations of one
    without it; decoding the routing happens at the read (and gives the statistics the direct count checks)."""
    model = models[model_type]
    inputs = H.example_inputs(model, batch_size=2)
    with torch.no_grad():
        with overhead.AtenOpCount() as off:
            model(**inputs)
        with H.routing_capture(model) as capture:
            with overhead.AtenOpCount() as on:
                model(**inputs)
            assert all(record._pending is not None for record in capture.records.values())  # every router called
            with overhead.AtenOpCount() as read:
                stats = mome.routing_stats(model)
    assert off.count > 0 and on.count == off.count
    assert read.count > 0 and len(stats) == len(capture.records)


def test_the_overhead_tool_counts_and_times(capsys):
    """``python tools/hf_routing_overhead.py --count-ops`` and its timing mode (one short round here)."""
    assert overhead.main(["--count-ops", "--families", "llama4"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    counts = overhead.count_ops("llama4")
    assert row == ["llama4", *(str(counts[key]) for key in ("routers", "off", "on", "read"))]
    assert counts["routers"] == 2 and counts["on"] == counts["off"] > 0 and counts["read"] > 0
    assert overhead.main(["--rounds", "1", "--calls", "1", "--families", "llama4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("llama4 ")
