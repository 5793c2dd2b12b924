"""``mome-eval`` on transformers' MoE VLMs (:mod:`mome.models.hf_moe_vlm`): the routing report counts their
captured routers per modality as a direct count from the model's own router logits does; ``eval_task=vqa``
answers through the family's processor (the tiny models saved with a tiny processor), one question at a time or a
batch in one left-padded ``generate`` call; ``eval_task=zero_shot`` ranks the class names by likelihood."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mome

pytest.importorskip("transformers")
from test_eval_cli import FAST, _fails_early, compose_eval  # noqa: E402
from test_hf_moe_vlms import TEXT, _direct_loads, _independent_modality  # noqa: E402

from mome.cli.eval import evaluate  # noqa: E402
from mome.data.digits import DIGIT_CLASSNAMES, digits_splits  # noqa: E402
from mome.data.shapes import vocabulary  # noqa: E402
from mome.lit.llava import exact_match  # noqa: E402
from mome.lit.metrics import RESULT_SCHEMA  # noqa: E402
from mome.lit.routing_report import RoutingRecorder  # noqa: E402
from mome.models import hf_moe_vlm as H  # noqa: E402

FAMILIES = sorted(H.FAMILIES)
MODALITY = ("image", "text", "video", "audio")
#: the tiny processors' words: the shapes questions' and the digits' class names (docs/hf_moe_vlms.md)
WORDS = vocabulary() + list(DIGIT_CLASSNAMES)


@pytest.fixture(scope="module")
def models():
    built = {}
    for model_type in FAMILIES:
        torch.manual_seed(0)
        built[model_type] = mome.create_model(f"{model_type}_tiny")
    return built


def _report_rows(entry, num_modalities):
    """``[M, E]`` of a report layer's per-modality loads (zeros for a modality it did not see)."""
    rows = torch.zeros(num_modalities, entry["num_experts"], dtype=torch.float64)
    for name, values in entry["per_modality"].items():
        rows[MODALITY.index(name)] = torch.tensor(values["expert_load"], dtype=torch.float64)
    return rows


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_routing_report_counts_the_captured_routers_per_modality(models, model_type):
    model = models[model_type]
    family = H.family_of(model)
    inputs = H.example_inputs(model, batch_size=2)
    recorder = RoutingRecorder().attach(model)
    try:
        with torch.no_grad():
            model(**inputs)
            model(**inputs)  # counted over both passes: the shares stay, the token counts double
    finally:
        recorder.detach()
    assert not any(name.endswith(".routing") for name, _ in model.named_modules())  # its capture is off again
    report = recorder.report()
    modality = _independent_modality(inputs)
    direct = _direct_loads(model, inputs, modality)
    assert list(report["layers"]) == list(H.router_taps(model))
    assert len(report["layers"]) == len(direct)
    for (name, entry), (per_modality, load) in zip(report["layers"].items(), direct, strict=True):
        rows = _report_rows(entry, family.num_modalities)
        seen = per_modality.sum(-1) > 0
        assert torch.allclose(rows.sum(-1)[seen], torch.ones(int(seen.sum()), dtype=torch.float64)), name
        assert torch.allclose(rows, per_modality.double(), atol=1e-6), name
        assert torch.allclose(torch.tensor(entry["expert_load"]), load, atol=1e-6), name
        assert entry["dropped_fraction"] == 0.0 and entry["kind"] == "sparse"
    layer = report["layers"][next(iter(report["layers"]))]
    if family.model_type != "ernie4_5_vl_moe":  # ERNIE's first router sees the text tokens only
        assert layer["per_modality"]["image"]["tokens"] == 2 * int((modality == 0).sum())
        assert layer["per_modality"]["text"]["tokens"] == 2 * int((modality == TEXT).sum())
    # the image tokens counted as text give another report: the comparison above would fail
    mixed = _direct_loads(model, inputs, torch.full_like(modality, TEXT))
    assert any(
        not torch.allclose(_report_rows(entry, family.num_modalities), per_modality.double(), atol=1e-6)
        for entry, (per_modality, _) in zip(report["layers"].values(), mixed, strict=True)
    )


def test_the_routing_report_shares_a_capture_that_is_on_already(models):
    model = models["qwen3_vl_moe"]
    inputs = H.example_inputs(model)
    with torch.no_grad(), H.routing_capture(model):
        recorder = RoutingRecorder().attach(model)
        model(**inputs)
        recorder.detach()
        assert mome.routing_stats(model)  # the user's capture is still on
    assert set(recorder.report()["layers"]) == set(H.router_taps(model))
    assert not any(name.endswith(".routing") for name, _ in model.named_modules())


# ------------------------------------------------------------------------------------- mome-eval eval_task=vqa
#: the families with a tiny processor (``hf_moe_vlm.tiny_processor``)
WITH_PROCESSOR = ["qwen3_vl_moe", "glm4v_moe", "ernie4_5_vl_moe", "qwen3_omni_moe", "llama4"]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """``hf_moe_vlm.save_tiny``: a family's tiny model and tiny processor, as a Hub snapshot lays them out (made
    once per family)."""
    made = {}

    def folder(model_type):
        if model_type not in made:
            made[model_type] = H.save_tiny(tmp_path_factory.mktemp("tiny") / model_type, model_type, WORDS)
        return made[model_type]

    return folder


@pytest.fixture(scope="module")
def tiny_folder(tiny_folders):
    return tiny_folders("qwen3_vl_moe")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return ["data=shapes", f"data.root={root}", "data.train_size=4", "data.val_size=4", "data.test_size=6"]


def _router_counts(model, inputs, modality, top_k):
    """``[per-modality counts [M, E]]`` per router: top-k of the model's own ``output_router_logits``; ERNIE's text
    experts route the text tokens and its vision experts the others (its processor's ``moe_mm_token_type_ids``)."""
    with torch.no_grad():
        router_logits = model(**inputs, output_router_logits=True).router_logits
    subsets = [None]
    if "moe_mm_token_type_ids" in inputs:
        vision = inputs["moe_mm_token_type_ids"].reshape(-1).bool()
        subsets = [~vision, vision]
    found = []
    for logits in router_logits:
        logits = logits.reshape(modality.shape[0], -1)  # [T, E]
        for subset in subsets:
            rows, mods = (logits, modality) if subset is None else (logits[subset], modality[subset])
            index = rows.topk(top_k, dim=-1).indices  # [T', k]
            counts = torch.zeros(3, logits.shape[-1], dtype=torch.float64)
            ones = torch.ones(index.numel(), dtype=torch.float64)
            counts.index_put_((mods.repeat_interleave(top_k), index.reshape(-1)), ones, True)
            found.append(counts)
    return found


def _direct_report(folder, predictions, root, max_new_tokens):
    """The greedy answers and the routed tokens' counts, made here with transformers alone: the processor's chat
    template and images, ``generate``, then one forward over the prompt and the answer's tokens but the last (the
    tokens the decoding routed) with ``output_router_logits``; modality from the image placeholder id."""
    import transformers
    from PIL import Image

    family = H.FAMILIES[H.transformers_folder_family(folder)]
    model = getattr(transformers, family.model_class).from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    records = {r["id"]: r for r in json.loads((root / "test.json").read_text())}
    answers, image_as_image, image_as_text = [], None, None
    for prediction in predictions:
        record = records[prediction["id"]]
        content = [{"type": "image"}, {"type": "text", "text": prediction["question"]}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        image = Image.open(root / record["image"]).convert("RGB")
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}  # Llama 4: bf16
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        prompt_length = inputs["input_ids"].shape[1]
        answers.append(processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)[0].strip())
        routed = output[:, :-1]  # [1, L + n - 1]
        full = {**inputs, "input_ids": routed, "attention_mask": torch.ones_like(routed)}
        for key in ("mm_token_type_ids", "moe_mm_token_type_ids"):  # the processor's; the answer's tokens are text
            if key in inputs:
                full[key] = torch.cat([inputs[key], inputs[key].new_zeros(1, routed.shape[1] - prompt_length)], 1)
        modality = torch.where(routed.reshape(-1) == 100, 0, 1)
        top_k = getattr(model.config.text_config, family.text_config_top_k)
        for name, mods in (("right", modality), ("mixed", torch.ones_like(modality))):
            counts = _router_counts(model, full, mods, top_k)
            total = image_as_image if name == "right" else image_as_text
            total = counts if total is None else [a + b for a, b in zip(total, counts, strict=True)]
            image_as_image, image_as_text = (total, image_as_text) if name == "right" else (image_as_image, total)
    return answers, image_as_image, image_as_text


@pytest.mark.slow
@pytest.mark.parametrize("model_type", WITH_PROCESSOR)
def test_vqa_on_a_transformers_moe_vlm_through_its_processor(tmp_path, tiny_folders, shapes, model_type):
    """``mome-eval model=local-dir:FOLDER eval_task=vqa data=shapes`` on a tiny model saved with its tiny
    processor: one prediction per question, scored as the MoE-LLaVA path scores, the answers those of the processor
    and generate run directly, and a routing report whose image and text loads equal a direct count."""
    jsonschema = pytest.importorskip("jsonschema")
    tiny_folder = tiny_folders(model_type)
    out = tmp_path / "eval"
    overrides = [f"model=local-dir:{tiny_folder}", "eval_task=vqa", *shapes, *FAST, "eval_task.max_new_tokens=3"]
    record, _ = evaluate(compose_eval(out, [*overrides, "max_samples=4"]))
    assert json.loads((out / "results.json").read_text()) == record
    jsonschema.validate(record, RESULT_SCHEMA)
    assert record["task"] == "vqa" and record["model"] == f"local-dir:{tiny_folder}" and "cost" not in record
    assert "processor" in record["protocol"]["prompt"]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    root = Path(shapes[1].split("=", 1)[1])
    references = json.loads((root / "test.json").read_text())[:4]
    assert record["n_samples"] == len(predictions) == 4
    assert [p["id"] for p in predictions] == [r["id"] for r in references]  # dataset order, once each
    assert [p["answer"] for p in predictions] == [r["conversations"][1]["value"] for r in references]
    for p in predictions:
        assert p["hit"] == exact_match(p["prediction"], p["answer"]) and "<image>" not in p["question"]
    assert record["metrics"]["exact_match"] == pytest.approx(sum(p["hit"] for p in predictions) / 4)

    answers, direct, image_as_text = _direct_report(tiny_folder, predictions, root, max_new_tokens=3)
    assert [p["prediction"] for p in predictions] == answers and any(answers)
    report = json.loads((out / "routing.json").read_text())
    assert len(report["layers"]) == len(direct) >= 1
    text_config = H.tiny_config(model_type).get_text_config()
    top_k = getattr(text_config, H.FAMILIES[model_type].text_config_top_k)
    for (name, entry), counts in zip(report["layers"].items(), direct, strict=True):
        seen = [modality for m, modality in enumerate(MODALITY[:3]) if counts[m].sum() > 0]
        assert list(entry["per_modality"]) == seen, name  # ERNIE's text experts see no image token
        for m, modality in enumerate(MODALITY[:3]):
            if modality in seen:
                values = entry["per_modality"][modality]
                loads = (counts[m] / counts[m].sum()).tolist()
                assert values["tokens"] * top_k == int(counts[m].sum()), name
                assert values["expert_load"] == pytest.approx(loads, abs=1e-9) and sum(loads) == pytest.approx(1.0)
    assert {m for entry in report["layers"].values() for m in entry["per_modality"]} == {"image", "text"}
    # the image tokens counted as text: another text row, which the comparison above would refuse
    assert any(
        entry["per_modality"].get("text", {}).get("expert_load")
        != pytest.approx((counts[1] / counts[1].sum()).tolist(), abs=1e-9)
        for entry, counts in zip(report["layers"].values(), image_as_text, strict=True)
    )


def test_vqa_on_a_transformers_moe_vlm_without_a_processor_fails_early(tmp_path, capsys, shapes):
    line = _fails_early(tmp_path, capsys, ["model=qwen3_vl_moe_tiny", "eval_task=vqa", *shapes], "has no processor")
    assert "TaskConfigError" in line and "qwen3_vl_moe_tiny" in line and "processor_config.json" in line
    assert "it was built from a config" in line


def test_a_transformers_folder_refuses_mome_loading_options(tiny_folder):
    model = mome.create_model(f"local-dir:{tiny_folder}")
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert type(H.folder_processor(model, "tiny")).__name__ == "Qwen3VLProcessor"
    with pytest.raises(mome.UnsupportedOptionError, match="checkpoint_path.*transformers save_pretrained folder"):
        mome.create_model(f"local-dir:{tiny_folder}", checkpoint_path="weights.safetensors")


# ------------------------------------------------------------------------------------------- disabling experts
@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_disabled_expert_gets_no_token_and_the_output_changes(models, model_type):
    model = models[model_type]
    inputs = H.example_inputs(model, batch_size=2)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        before = model(**inputs).logits
    recorder = RoutingRecorder().attach(model)
    try:
        with torch.no_grad(), H.experts_disabled(model, [1]) as handle:
            after = model(**inputs).logits
    finally:
        recorder.detach()
    assert set(handle.experts) == set(H.router_taps(model)) and all(e == [1] for e in handle.experts.values())
    report = recorder.report()["layers"]
    assert report and all(entry["expert_load"][1] == 0.0 for entry in report.values())
    for entry in report.values():
        assert all(values["expert_load"][1] == 0.0 for values in entry["per_modality"].values())
        assert sum(entry["expert_load"]) == pytest.approx(1.0)
    assert not torch.allclose(after, before)  # expert 1 had tokens: their outputs changed
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)  # enabled again: the model as it was
    restored = model.state_dict()  # GLM-4.5V's correction bias restored, Llama 4's added bias gone
    assert list(restored) == list(state) and all(torch.equal(restored[k], v) for k, v in state.items())


@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "qwen3_omni_moe", "aria"])
def test_the_reselection_with_nothing_disabled_is_the_routers_own_choice(models, model_type):
    """The families whose router has no knob get their choice replaced by a hook: with no expert disabled, the hook's
    rule (softmax, top-k, renormalised) gives the router's own experts and weights."""
    router = next(iter(H.router_taps(models[model_type]).values())).module
    hidden = torch.randn(64, models[model_type].config.get_text_config().hidden_size)
    with torch.no_grad():
        output = router(hidden)
        logits, weights, index = H._reselect_hook(torch.zeros(router.num_experts, dtype=torch.bool))(
            router, (hidden,), output
        )
    assert torch.equal(logits, output[0]) and torch.equal(index, output[2])
    assert torch.allclose(weights, output[1], atol=1e-6)


def test_disabling_too_many_or_unknown_experts_is_a_typed_error(models):
    model = models["qwen3_vl_moe"]  # 4 experts, top-2
    with pytest.raises(mome.InvalidArgumentError, match="at least top_k=2 experts"):
        H.disable_experts(model, [0, 1, 2])
    with pytest.raises(mome.InvalidArgumentError, match=r"indices in \[0, 4\)"):
        H.disable_experts(model, [4])
    with pytest.raises(mome.InvalidArgumentError, match="router names"):
        H.disable_experts(model, {"no.such.router": [0]})


def test_vqa_with_a_disabled_expert_and_fewer_experts_per_token(tmp_path, tiny_folder, shapes):
    """``eval_task.disabled_experts=[1] eval_task.top_k=1``: expert 1 gets no token in any router and modality of
    the routing report, every token goes to one expert, and the results record the settings."""
    out = tmp_path / "eval"
    overrides = [f"model=local-dir:{tiny_folder}", "eval_task=vqa", *shapes, *FAST, "max_samples=3"]
    overrides += ["eval_task.max_new_tokens=2", "eval_task.disabled_experts=[1]", "eval_task.top_k=1"]
    record, objects = evaluate(compose_eval(out, overrides))
    assert record["protocol"]["disabled_experts"] == [1] and record["protocol"]["top_k"] == 1
    report = json.loads((out / "routing.json").read_text())["layers"]
    for name, entry in report.items():
        counts = objects["task"]._recorder.layers[name]
        assert float(counts.kept.sum()) == float(counts.tokens.sum()) == entry["tokens"], name  # top-1
        for values in [entry, *entry["per_modality"].values()]:
            assert values["expert_load"][1] == 0.0 and sum(values["expert_load"]) == pytest.approx(1.0), name
    model = objects["task"].model  # enabled again after the run
    assert all(tap.module.top_k == 2 and not tap.module._forward_hooks for tap in H.router_taps(model).values())


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("eval_task.disabled_experts=[0,1,2]", "leaving at least top_k=2 experts"),  # 4 experts, top-2
        ("eval_task.top_k=9", "top_k must be an int in [1, 4]"),
    ],
)
def test_bad_routing_controls_fail_early(tmp_path, capsys, tiny_folder, shapes, override, expected):
    overrides = [f"model=local-dir:{tiny_folder}", "eval_task=vqa", *shapes, override]
    assert "InvalidArgumentError" in _fails_early(tmp_path, capsys, overrides, expected)


def test_routing_controls_are_for_transformers_models(tmp_path, capsys, shapes):
    overrides = ["model=moe_llava_tiny_e4", "eval_task=vqa", *shapes, "eval_task.top_k=1"]
    line = _fails_early(tmp_path, capsys, overrides, "eval_task.top_k applies to transformers' MoE VLMs")
    assert "TaskConfigError" in line and "moe_llava_tiny_e4" in line


def test_tiny_processors_fit_their_tiny_configs_and_aria_has_none():
    for model_type in WITH_PROCESSOR:
        H.check_processor(H.tiny_processor(model_type, WORDS), H.tiny_config(model_type), f"{model_type}_tiny")
    config = H.tiny_config("llama4")
    config.image_token_index = 101  # <|image|>, not the patch placeholder <|patch|> (100)
    with pytest.raises(mome.ProcessorMismatchError, match=r"image token '<\|patch\|>' is id 100, config.image_token_"):
        H.check_processor(H.tiny_processor("llama4", vocabulary()), config, "llama4_tiny")
    with pytest.raises(mome.UnsupportedModelError, match=r"tiny_processor\('aria'\): a tiny processor is built for"):
        H.tiny_processor("aria", vocabulary())


# ------------------------------------------------------------------------------- batched generation (eval_task=vqa)
def _questions(count):
    """The first ``count`` shapes questions (different lengths: the batch is padded) as chat content, with images."""
    from mome.data.shapes import shapes_records

    records = list(shapes_records(count, seed=0))
    contents, images = [], []
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        contents.append([{"type": "image"}, {"type": "text", "text": question}])
        images.append([record["image"]])
    return contents, images


@pytest.mark.parametrize("model_type", WITH_PROCESSOR)
def test_batched_generation_equals_one_question_at_a_time(tiny_folders, model_type):
    """``generate_answers``: one left-padded ``generate`` call gives each question the answer it gets alone; the
    padded batch's next-token logits are each prompt's own (the tiny ERNIE answers every question alike)."""
    model = mome.create_model(f"local-dir:{tiny_folders(model_type)}")
    processor = H.folder_processor(model, model_type)
    contents, images = _questions(4)
    prompts = [H.chat_prompt(processor, content) for content in contents]
    batch = H.processor_inputs(model, processor, prompts, [image for turn in images for image in turn], "left")
    assert not batch["attention_mask"].all()  # prompts of different lengths: the batch has pads
    with torch.no_grad():
        padded = model(**batch).logits[:, -1]  # [4, V]
        alone = [model(**H.processor_inputs(model, processor, [p], i)).logits[0, -1] for p, i in zip(prompts, images)]
    assert torch.allclose(padded, torch.stack(alone), atol=1e-4)
    batched = H.generate_answers(model, processor, contents, images, max_new_tokens=5)
    single = [
        H.generate_answer(model, processor, c, i, max_new_tokens=5) for c, i in zip(contents, images, strict=True)
    ]
    assert batched == single and all(single)


def test_vqa_batches_the_questions_without_the_routing_report(tmp_path, tiny_folder, shapes, monkeypatch):
    """``routing_report=false data.eval_batch_size=3``: the questions of a batch go through one ``generate_answers``
    call, and the predictions are those of the run that answers one question at a time (with the routing report)."""
    calls = []
    batched_generation = H.generate_answers

    def spy(model, processor, contents, images, max_new_tokens):
        calls.append(len(contents))
        return batched_generation(model, processor, contents, images, max_new_tokens)

    monkeypatch.setattr(H, "generate_answers", spy)
    overrides = [f"model=local-dir:{tiny_folder}", "eval_task=vqa", *shapes, *FAST, "eval_task.max_new_tokens=3"]
    overrides += ["max_samples=5", "data.eval_batch_size=3"]
    predictions = {}
    for report in ("true", "false"):
        calls.clear()
        out = tmp_path / report
        evaluate(compose_eval(out, [*overrides, f"routing_report={report}"]))
        predictions[report] = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert calls == ([1] * 5 if report == "true" else [3, 2])
    assert predictions["false"] == predictions["true"] and len(predictions["true"]) == 5


# --------------------------------------------------------------------------------------- eval_task=zero_shot
def _direct_log_likelihood(model, processor, content, image, answer):
    """``log p(answer | prompt)``: one unpadded forward of the prompt and the answer, summed over the answer's
    tokens (the prompt's length from the processor run on the prompt alone)."""
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    num_prompt = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(text=[prompt + answer], images=[image], return_tensors="pt")
    inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}  # Llama 4: bf16
    with torch.no_grad():
        log_probs = model(**inputs).logits[0].float().log_softmax(-1)  # [L, V]
    ids = inputs["input_ids"][0]
    return sum(log_probs[t - 1, ids[t]].item() for t in range(num_prompt, ids.shape[0]))


@pytest.mark.parametrize("model_type", WITH_PROCESSOR)
def test_answer_log_likelihoods_equal_one_forward_per_answer(tiny_folders, model_type):
    """All the answers in one right-padded forward score as each answer alone (answers of 1 to 3 tokens)."""
    from PIL import Image

    model = mome.create_model(f"local-dir:{tiny_folders(model_type)}")
    processor = H.folder_processor(model, model_type)
    content = [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]
    image = Image.new("RGB", (8, 8), (40, 200, 90))
    answers = ["seven", "two red circles", "the digit nine"]
    scores = H.answer_log_likelihoods(model, processor, content, [image], answers)
    direct = [_direct_log_likelihood(model, processor, content, image, answer) for answer in answers]
    assert scores.shape == (3,) and torch.allclose(
        scores.double(), torch.tensor(direct, dtype=torch.float64), atol=1e-4
    )
    with pytest.raises(mome.InvalidArgumentError, match="answers of at least one token"):
        H.answer_log_likelihoods(model, processor, content, [image], ["seven", ""])


def _zero_shot(tmp_path, folder, extra):
    out = tmp_path / "zero_shot"
    overrides = [f"model=local-dir:{folder}", "eval_task=zero_shot", "data=digits", *FAST, *extra]
    record, objects = evaluate(compose_eval(out, overrides))
    return record, out


def test_zero_shot_ranks_the_classes_by_a_direct_log_likelihood(tmp_path, tiny_folders):
    """``mome-eval model=local-dir:FOLDER eval_task=zero_shot data=digits`` (tiny Qwen3-VL-MoE): the metrics are those
    of the class scores computed here with transformers alone (each template filled with each class name scored
    in its own forward, the mean over the templates), and the routing report counts each image's prompt once, per
    modality and class."""
    import torchmetrics.functional as M
    from PIL import Image

    jsonschema = pytest.importorskip("jsonschema")
    folder = tiny_folders("qwen3_vl_moe")
    templates = ["{}", "the digit {}."]
    record, out = _zero_shot(
        tmp_path, folder, ["max_samples=8", f"eval_task.templates=[{','.join(map(repr, templates))}]"]
    )
    jsonschema.validate(record, RESULT_SCHEMA)
    assert record["task"] == "zeroshot_classification" and record["n_samples"] == 8 and "cost" not in record
    assert (
        record["protocol"]["question"] == "What is in the image?" and "log-likelihood" in record["protocol"]["scoring"]
    )

    import transformers

    model = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    images, labels = digits_splits()["test"]
    images = [Image.fromarray(array, mode="L").convert("RGB") for array in images[:8]]
    labels = torch.as_tensor(labels[:8])
    content = [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]
    scores = torch.tensor(
        [
            [
                sum(_direct_log_likelihood(model, processor, content, image, t.format(name)) for t in templates) / 2
                for name in DIGIT_CLASSNAMES
            ]
            for image in images
        ]
    )  # [8, 10]
    top5 = scores.topk(5, dim=1).indices
    assert record["metrics"]["acc1"] == pytest.approx((scores.argmax(1) == labels).float().mean().item(), abs=1e-6)
    assert record["metrics"]["acc5"] == pytest.approx((top5 == labels[:, None]).any(1).float().mean().item(), abs=1e-6)
    recall = M.classification.multiclass_recall(scores, labels, num_classes=10, average="macro").item()
    assert record["metrics"]["mean_per_class_recall"] == pytest.approx(recall, abs=1e-6)
    assert all(len(set(row.tolist())) == 10 for row in scores)  # the class names are tiny-vocabulary words: no ties
    assert 0 < record["metrics"]["acc5"] < 1  # the random model ranks some labels in its top 5, not all

    report = json.loads((out / "routing.json").read_text())
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    ids = processor(text=[prompt], images=[images[0]], return_tensors="pt")["input_ids"][0]
    num_image = int((ids == 100).sum())  # the digits (8 px) go in at 32 px: 4 placeholders
    for entry in report["layers"].values():  # the prompts only: the answers' forwards are not counted
        assert entry["per_modality"]["image"]["tokens"] == 8 * num_image
        assert entry["per_modality"]["text"]["tokens"] == 8 * (ids.shape[0] - num_image)
        assert entry["per_class"]["classnames"] == list(DIGIT_CLASSNAMES)
    assert (out / "routing_per_class.png").is_file()


@pytest.mark.parametrize("model_type", [t for t in WITH_PROCESSOR if t != "qwen3_vl_moe"])
def test_zero_shot_on_every_family_with_a_processor(tmp_path, tiny_folders, model_type):
    """The same command on the other families: the scores of ``answer_log_likelihoods`` (checked against one
    forward per answer above) ranked by torchmetrics as for a CLIP model."""
    record, out = _zero_shot(tmp_path, tiny_folders(model_type), ["max_samples=3"])  # the digits' 6 templates
    assert (
        record["n_samples"] == 3
        and record["protocol"]["num_templates"] == 6
        and set(record["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    )
    assert all(0.0 <= value <= 1.0 for value in record["metrics"].values())
    report = json.loads((out / "routing.json").read_text())
    assert {m for entry in report["layers"].values() for m in entry["per_modality"]} == {"image", "text"}


def test_zero_shot_on_a_transformers_moe_vlm_without_a_processor_fails_early(tmp_path, capsys):
    overrides = ["model=qwen3_vl_moe_tiny", "eval_task=zero_shot", "data=digits"]
    line = _fails_early(tmp_path, capsys, overrides, "eval_task=zero_shot: qwen3_vl_moe_tiny has no processor")
    assert "TaskConfigError" in line and "processor_config.json" in line


def test_the_zero_shot_question_is_for_transformers_models(tmp_path, capsys):
    overrides = ["model.model_name=limoe_tiny_patch8_e4", "eval_task=zero_shot", "eval_task.question=what"]
    line = _fails_early(tmp_path, capsys, overrides, "eval_task.question applies to transformers' MoE VLMs")
    assert "TaskConfigError" in line and "limoe_tiny_patch8_e4" in line


def test_an_empty_zero_shot_question_fails_early(tmp_path, capsys, tiny_folder):
    overrides = [f"model=local-dir:{tiny_folder}", "eval_task=zero_shot", "data=digits", "eval_task.question=' '"]
    line = _fails_early(tmp_path, capsys, overrides, "eval_task.question must be a non-empty string")
    assert "TaskConfigError" in line


def _scoring_choices(monkeypatch):
    """The experts every router call of the zero-shot scoring (``answer_log_likelihoods``) chose, ``[T, k]`` each:
    a forward hook on each router, run after any other (so after the disabling hook that re-selects)."""
    chosen = []
    scoring = H.answer_log_likelihoods

    def spy(model, processor, content, images, answers):
        def record(module, args, output):
            chosen.append(output[2].clone())

        handles = [tap.module.register_forward_hook(record) for tap in H.router_taps(model).values()]
        try:
            return scoring(model, processor, content, images, answers)
        finally:
            for handle in handles:
                handle.remove()

    monkeypatch.setattr(H, "answer_log_likelihoods", spy)
    return chosen


@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "glm4v_moe"])  # a re-selecting hook; a bias at -inf
def test_zero_shot_with_a_disabled_expert_and_fewer_experts_per_token(tmp_path, tiny_folders, monkeypatch, model_type):
    """``mome-eval ... eval_task=zero_shot data=digits eval_task.disabled_experts=[1] eval_task.top_k=1``: every
    router call of the answers' scoring sends each token to one expert, never expert 1, and so does the routing
    report of the prompts; the results record the settings; after the run the model is its own again (routers,
    state and logits as loaded) and routes tokens to expert 1."""
    folder = tiny_folders(model_type)
    chosen = _scoring_choices(monkeypatch)
    overrides = [f"model=local-dir:{folder}", "eval_task=zero_shot", "data=digits", *FAST, "max_samples=2"]
    overrides += ["eval_task.templates=['{}']", "eval_task.disabled_experts=[1]", "eval_task.top_k=1"]
    out = tmp_path / "zero_shot"
    record, objects = evaluate(compose_eval(out, overrides))
    assert record["protocol"]["disabled_experts"] == [1] and record["protocol"]["top_k"] == 1
    assert len(chosen) == 2 * len(H.router_taps(objects["task"].model))  # 2 images, one scoring forward each
    assert all(index.shape[-1] == 1 and not (index == 1).any() for index in chosen)
    report = json.loads((out / "routing.json").read_text())["layers"]
    assert report
    for name, entry in report.items():
        counts = objects["task"]._recorder.layers[name]
        assert float(counts.kept.sum()) == float(counts.tokens.sum()) == entry["tokens"], name  # top-1
        for values in [entry, *entry["per_modality"].values()]:
            assert values["expert_load"][1] == 0.0 and sum(values["expert_load"]) == pytest.approx(1.0), name

    model, loaded = objects["task"].model, mome.create_model(f"local-dir:{folder}")
    assert all(tap.module.top_k == 2 and not tap.module._forward_hooks for tap in H.router_taps(model).values())
    state = model.state_dict()
    assert list(state) == list(loaded.state_dict())
    assert all(torch.equal(state[key], value) for key, value in loaded.state_dict().items())
    inputs = H.example_inputs(model, batch_size=2)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    chosen.clear()
    images = digits_splits()["test"][0][:2]
    processor = H.folder_processor(model, model_type)
    content = [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]
    from PIL import Image

    for array in images:
        H.answer_log_likelihoods(model, processor, content, [Image.fromarray(array, mode="L").convert("RGB")], ["two"])
    assert any((index == 1).any() for index in chosen)  # enabled again: expert 1 gets tokens (the check above can fail)


def test_bad_zero_shot_routing_controls_fail_early(tmp_path, capsys, tiny_folder):
    overrides = [f"model=local-dir:{tiny_folder}", "eval_task=zero_shot", "data=digits", "eval_task.top_k=9"]
    assert "InvalidArgumentError" in _fails_early(tmp_path, capsys, overrides, "top_k must be an int in [1, 4]")


def test_zero_shot_routing_controls_are_for_transformers_models(tmp_path, capsys):
    overrides = ["model.model_name=limoe_tiny_patch8_e4", "eval_task=zero_shot", "eval_task.disabled_experts=[1]"]
    line = _fails_early(tmp_path, capsys, overrides, "eval_task.disabled_experts applies to transformers' MoE VLMs")
    assert "TaskConfigError" in line and "limoe_tiny_patch8_e4" in line
