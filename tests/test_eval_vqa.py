"""mome-eval eval_task=vqa: a MoE-LLaVA model answers the shapes questions; exact match after normalisation,
results.json + predictions.jsonl; the wrong model or data fails early with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_eval_cli import FAST, _fails_early, compose_eval
from torch.utils.data import DistributedSampler

import mome.lit.llava
from mome.cli.eval import evaluate
from mome.lit.llava import exact_match, normalize_answer
from mome.lit.metrics import RESULT_SCHEMA
from mome.lit.unique_samples import first_occurrences, select_samples

MODEL = "model=moe_llava_tiny_e4"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> list[str]:
    """Overrides for a tiny shapes VQA set (8 test questions), generated once for the module."""
    root = tmp_path_factory.mktemp("shapes")
    return ["data=shapes", f"data.root={root}", "data.train_size=4", "data.val_size=4", "data.test_size=8"]


def _references(overrides: list[str]) -> list[str]:
    root = Path(next(o for o in overrides if o.startswith("data.root=")).split("=", 1)[1])
    return [record["conversations"][1]["value"] for record in json.loads((root / "test.json").read_text())]


def _vqa(tmp_path: Path, shapes: list[str], *extra: str) -> tuple[dict, list[dict], Path]:
    out = tmp_path / "eval"
    record, _ = evaluate(compose_eval(out, [MODEL, "eval_task=vqa", *shapes, *FAST, *extra]))
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return record, predictions, out


# -------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("  Red. ", "red"),  # case, surrounding space, final period
        ("The  circle!", "circle"),  # article, inner whitespace, punctuation
        ("an apple, a pear", "apple pear"),
        ("Left\t side?", "left side"),
        ("theatre", "theatre"),  # articles only as whole words
        ("don't", "dont"),
    ],
)
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match():
    assert exact_match("Two.", "two") and exact_match(" the SQUARE ", "square")
    assert not exact_match("two", "three") and not exact_match("red square", "red")


def test_duplicates_are_removed_from_per_sample_lists():
    mask = torch.tensor([True, False, True])
    assert select_samples(["a", "b", "c"], mask) == ["a", "c"]
    assert torch.equal(select_samples(torch.arange(3), mask), torch.tensor([0, 2]))
    assert select_samples(["not", "per-sample"], mask) == ["not", "per-sample"]


def test_first_occurrences_keep_each_sample_once():
    sampler = [list(DistributedSampler(range(5), num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    assert sampler == [[0, 2, 4], [1, 3, 0]]  # rank 1 repeats sample 0 to get as many samples
    keep = first_occurrences(torch.tensor(sampler))
    assert keep.tolist() == [[True, True, True], [True, True, False]]
    assert first_occurrences(torch.tensor([[0, 2], [1, -1]])).tolist() == [[True, True], [True, False]]  # -1: none


# ------------------------------------------------------------------------------------------- CLI runs
def test_vqa_writes_results_and_predictions(tmp_path, shapes):
    jsonschema = pytest.importorskip("jsonschema")
    record, predictions, out = _vqa(tmp_path, shapes, "max_samples=6", "eval_task.max_new_tokens=3")
    assert json.loads((out / "results.json").read_text()) == record
    jsonschema.validate(record, RESULT_SCHEMA)
    assert record["task"] == "vqa" and record["dataset"] == "shapes" and record["model"] == "moe_llava_tiny_e4"
    assert record["n_samples"] == len(predictions) == 6 and record["protocol"]["max_new_tokens"] == 3
    assert [p["id"] for p in predictions] == [f"test-{i:06d}" for i in range(6)]  # dataset order, once each
    assert [p["answer"] for p in predictions] == _references(shapes)[:6]
    for p in predictions:
        assert p["hit"] == exact_match(p["prediction"], p["answer"]) and "<image>" not in p["question"]
    hits = [p["hit"] for p in predictions]
    assert record["metrics"]["exact_match"] == pytest.approx(sum(hits) / len(hits))
    for kind in {p["question_type"] for p in predictions}:
        kind_hits = [p["hit"] for p in predictions if p["question_type"] == kind]
        assert record["metrics"][f"exact_match/{kind}"] == pytest.approx(sum(kind_hits) / len(kind_hits))
    layers = json.loads((out / "routing.json").read_text())["layers"]  # the LLM's MoE layers were counted
    for entry in layers.values():  # the prompts' image placeholders are image tokens (16 per image), the rest text
        assert list(entry["per_modality"]) == ["image", "text"] and entry["per_modality"]["image"]["tokens"] == 6 * 16
    patches = json.loads((out / "routing_patches.json").read_text())  # the prompts' image patches, per MoE layer
    assert [image["index"] for image in patches["images"]] == list(range(6))  # one image per shapes question
    assert all(image["patch_grid"] == [4, 4] and len(image["layers"]) == 2 for image in patches["images"])
    assert (out / "routing_patch_map.png").exists()


@pytest.mark.parametrize(("reply", "expected", "report"), [("reference", 1.0, "true"), ("junk", 0.0, "false")])
def test_stubbed_generation_scores(tmp_path, shapes, monkeypatch, reply, expected, report):
    """generate_answers is the one generation function (LLaVATask.test_step uses it too; one prompt at a time with
    the routing report, the batch without): stubbed to give the reference (re-cased, with an article and
    punctuation) every answer is a hit; stubbed to give junk, none."""
    references = iter(_references(shapes))
    calls = []

    def stub(model, tokenizer, prompt_ids, images, max_new_tokens, media=None):
        calls.append(len(prompt_ids))
        return [f"  The {next(references).upper()}. " if reply == "reference" else "zzz qqq" for _ in prompt_ids]

    monkeypatch.setattr(mome.lit.llava, "generate_answers", stub)
    record, predictions, _ = _vqa(tmp_path, shapes, f"routing_report={report}", "data.eval_batch_size=4")
    assert calls == ([1] * 8 if report == "true" else [4, 4])
    assert sum(calls) == record["n_samples"] == len(predictions) == 8
    assert record["metrics"]["exact_match"] == expected
    assert all(p["hit"] == bool(expected) for p in predictions)
    assert all(value == expected for value in record["metrics"].values())


def test_batched_generation_gives_the_answers_of_one_prompt_at_a_time():
    """Prompts of different lengths, with 1 or 2 images, left-padded into one generate call: the same greedy
    tokens as each prompt alone (the tiny model's MoE layers drop no token at these sizes)."""
    from mome.lit.llava import generate_answer, generate_answers, left_pad

    torch.manual_seed(0)
    model = mome.create_model("moe_llava_tiny_e4").eval()
    tokenizer = mome.get_tokenizer("moe_llava_tiny_e4").tokenizer
    image = [model.config.image_token_id] * model.num_image_tokens
    prompts, images = [], []
    for length, count in ((3, 1), (11, 2), (6, 1), (1, 2)):
        words = torch.randint(5, 80, (length,)).tolist()
        prompts.append(torch.tensor([[1, *image * count, *words]]))
        images.append(torch.randn(count, *model.pretrained_cfg.input_size))
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    assert ids.shape == (4, 1 + 2 * len(image) + 11) and mask.sum(1).tolist() == [p.shape[1] for p in prompts]
    assert torch.equal(ids[1], prompts[1][0]) and (ids[0, : ids.shape[1] - prompts[0].shape[1]] == 0).all()
    batched = generate_answers(model, tokenizer, prompts, images, max_new_tokens=6)
    single = [generate_answer(model, tokenizer, p, i, max_new_tokens=6) for p, i in zip(prompts, images)]
    assert batched == single and sum(map(bool, batched)) >= 3  # not a comparison of empty strings


def test_vqa_without_the_routing_report_generates_in_batches_with_the_same_answers(tmp_path, shapes):
    common = ["max_samples=6", "eval_task.max_new_tokens=3", "data.eval_batch_size=3"]
    _, one_at_a_time, _ = _vqa(tmp_path / "report", shapes, *common)
    record, batched, out = _vqa(tmp_path / "batched", shapes, *common, "routing_report=false")
    assert batched == one_at_a_time and record["n_samples"] == 6
    assert not (out / "routing.json").exists()


def test_vqa_on_an_int8_model_answers_with_quantized_experts(tmp_path, shapes):
    """``quantize=int8`` on the generation path: every question is answered by the quantized model (its experts
    quantized), the mode is in results.json, and the answers are those of a model quantized by hand."""
    pytest.importorskip("torchao")
    import mome
    from mome.layers import Experts
    from mome.layers.experts import is_quantized

    common = ["max_samples=4", "eval_task.max_new_tokens=3", "routing_report=false", "seed=0"]
    record, predictions, _ = _vqa(tmp_path / "int8", shapes, *common, "quantize=int8")
    assert record["quantization"]["mode"] == "int8" and record["n_samples"] == len(predictions) == 4
    folder = tmp_path / "by_hand"
    torch.manual_seed(0)  # mome-eval's seed=0: the same random tiny model
    mome.save_pretrained(mome.quantize(mome.create_model("moe_llava_tiny_e4"), "int8"), folder)
    by_hand, expected, _ = _vqa(tmp_path / "folder", shapes, *common, f"model=local-dir:{folder}")
    assert by_hand["quantization"]["mode"] == "int8" and predictions == expected
    model = mome.create_model(f"local-dir:{folder}")
    assert all(is_quantized(e.w_in) for e in model.modules() if isinstance(e, Experts))


# --------------------------------------------------------------------------------------------- errors
def test_vqa_needs_a_llava_model(tmp_path, capsys, shapes):
    line = _fails_early(tmp_path, capsys, ["model=vmoe_tiny_patch8_e4", "eval_task=vqa", *shapes], "eval_task=vqa")
    assert "TaskConfigError" in line and "vmoe_tiny_patch8_e4" in line and "MoE-LLaVA" in line


def test_vqa_needs_questions_and_answers(tmp_path, capsys):
    line = _fails_early(tmp_path, capsys, [MODEL, "eval_task=vqa"], "DigitsDataModule has none")
    assert "DataConfigError" in line and "eval_task=vqa" in line


@pytest.mark.parametrize("task", ["zero_shot", "linear_probe"])
def test_image_tasks_refuse_conversations(tmp_path, capsys, shapes, task):
    overrides = ["model.model_name=limoe_tiny_patch8_e4", f"eval_task={task}", *shapes]
    line = _fails_early(tmp_path, capsys, overrides, f"eval_task={task} reads images")
    assert "ShapesDataModule" in line and "eval_task=vqa" in line


@pytest.mark.slow
def test_ddp_answers_every_question_once(tmp_path, shapes):
    """2 processes on 7 questions: the padded sampler repeats one; predictions and the cost equal the single-process
    run."""
    common = ["max_samples=7", "data.eval_batch_size=2", "eval_task.max_new_tokens=2"]
    single, single_predictions, _ = _vqa(tmp_path / "single", shapes, *common)
    ddp, ddp_predictions, _ = _vqa(tmp_path / "ddp", shapes, *common, "trainer=ddp_spawn")
    assert ddp["n_samples"] == single["n_samples"] == 7
    assert ddp_predictions == single_predictions and ddp["metrics"] == single["metrics"]
    # one sample's cost, measured in the spawned test processes (the model is pickled before any forward)
    assert ddp["cost"] == single["cost"] and ddp["cost"]["flops"] > 0
