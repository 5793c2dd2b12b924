"""mome-eval's metric code against hand-computed values, torchmetrics, CLIP_benchmark and open_clip."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import mome
from mome.data import DigitsDataModule
from mome.layers import SparseMoE, routing_stats
from mome.lit import ZeroShotClassificationTask
from mome.lit.metrics import RESULT_SCHEMA, fit_linear_probe, result_record, retrieval_recall_at_k
from mome.lit.routing_report import RoutingRecorder, write_routing_report

PNG = b"\x89PNG\r\n\x1a\n"


def _load_tool(name: str):
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------- retrieval recall@k
def test_recall_at_k_by_hand_with_ties_and_several_captions():
    # 2 images (rows) x 5 captions (columns); captions 0, 1, 2 describe image 0, captions 3, 4 image 1.
    scores = torch.tensor(
        [
            [0.2, 0.9, 0.1, 0.9, 0.5],  # best positive 0.9 (caption 1) tied with negative caption 3
            [0.8, 0.1, 0.1, 0.3, 0.7],  # best positive 0.7 (caption 4); one negative (0.8) above it
        ]
    )
    positives = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    # image -> text: image 0's rank = 1 + #{negatives >= 0.9} = 2; image 1's = 1 + #{0.8} = 2.
    assert retrieval_recall_at_k(scores, positives, (1, 2, 5)) == {1: 0.0, 2: 1.0, 5: 1.0}
    # text -> image, one positive image per caption: c0 0.2 < 0.8 -> rank 2; c1 0.9 > 0.1 -> 1;
    # c2 0.1 tied with its negative 0.1 -> 2; c3 0.3 < 0.9 -> 2; c4 0.7 > 0.5 -> 1.
    assert retrieval_recall_at_k(scores.T, positives.T, (1, 2)) == {1: pytest.approx(2 / 5), 2: 1.0}


def test_recall_at_k_constant_scores_get_no_credit():
    scores = torch.zeros(4, 4)
    positives = torch.eye(4, dtype=torch.bool)
    assert retrieval_recall_at_k(scores, positives, (1, 3, 4)) == {1: 0.0, 3: 0.0, 4: 1.0}


def test_recall_at_k_query_without_positive_is_a_miss():
    scores = torch.tensor([[0.5, 0.1], [0.2, 0.9]])
    positives = torch.tensor([[True, False], [False, False]])
    assert retrieval_recall_at_k(scores, positives, (1,)) == {1: 0.5}


def test_recall_at_k_equals_torchmetrics_hit_rate_without_ties():
    from torchmetrics.retrieval import RetrievalHitRate

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(12, 30, generator=generator)
    positives = torch.rand(12, 30, generator=generator) < 0.1
    positives[torch.arange(12), torch.arange(12)] = True
    ours = retrieval_recall_at_k(scores, positives, (1, 5, 10))
    indexes = torch.arange(12)[:, None].expand_as(scores)
    for k, value in ours.items():
        expected = RetrievalHitRate(top_k=k)(scores.flatten(), positives.flatten(), indexes=indexes.flatten())
        assert value == pytest.approx(float(expected))


def test_recall_at_k_equals_clip_benchmark_with_several_captions():
    zeroshot_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    generator = torch.Generator().manual_seed(1)
    num_images, per_image = 7, 3
    scores = torch.randn(num_images * per_image, num_images, generator=generator)  # [texts, images]
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(num_images * per_image), torch.arange(num_images).repeat_interleave(per_image)] = True
    for k in (1, 2, 5):
        # CLIP_benchmark: image_retrieval (text queries) and text_retrieval (image queries), hit if recall > 0
        text_queries = (zeroshot_retrieval.recall_at_k(scores, positives, k) > 0).float().mean()
        image_queries = (zeroshot_retrieval.recall_at_k(scores.T, positives.T, k) > 0).float().mean()
        assert retrieval_recall_at_k(scores, positives, (k,))[k] == pytest.approx(float(text_queries))
        assert retrieval_recall_at_k(scores.T, positives.T, (k,))[k] == pytest.approx(float(image_queries))


def test_recall_at_k_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must be equal"):
        retrieval_recall_at_k(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.bool))


# ------------------------------------------------------------------------------------- linear probe
def test_linear_probe_separates_separable_features():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 5
    labels = torch.arange(3).repeat(20)
    features = centres[labels] + 0.1 * torch.randn(60, 8, generator=generator)
    probs = fit_linear_probe(features[:45], labels[:45], features[45:])
    assert probs.shape == (15, 3)
    assert torch.equal(probs.argmax(1), labels[45:])
    assert torch.allclose(probs.sum(1), torch.ones(15), atol=1e-5)


def test_linear_probe_keeps_class_columns_missing_from_train():
    features = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    labels = torch.tensor([0, 0, 2, 2])  # class 1 never seen
    probs = fit_linear_probe(features, labels, torch.tensor([[5.05]]))
    assert probs.shape == (1, 3) and probs[0, 1] == 0 and probs.argmax() == 2


# ------------------------------------------------------------------------------------------- schema
def test_result_record_validates_against_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    record = result_record(
        {"acc1": 0.5, "acc5": 1.0}, dataset="digits", model="limoe_tiny_patch8_e4", pretrained="none",
        task="zeroshot_classification", n_samples=10,
    )  # fmt: skip
    jsonschema.validate(json.loads(json.dumps(record)), RESULT_SCHEMA)
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(record)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**record, "metrics": {"acc1": 87.5}}, RESULT_SCHEMA)  # percent, not a fraction
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in record.items() if k != "task"}, RESULT_SCHEMA)


# ------------------------------------------------------------------------------------ routing report
def _layer(capacity_factor=None):
    torch.manual_seed(0)
    return SparseMoE(8, 16, num_experts=4, top_k=2, router="top_k", capacity_factor=capacity_factor).eval()


def test_routing_recorder_accumulates_like_one_forward_over_the_whole_set():
    layer = _layer()
    model = torch.nn.Sequential(layer)
    x = torch.randn(5, 6, 8)  # 5 samples x 6 tokens
    recorder = RoutingRecorder().attach(model)
    with torch.no_grad():
        model(x[:2])
        model(x[2:])
    recorder.detach()
    with torch.no_grad():
        model(x)  # dropless: the routing of a token does not depend on its batch
    whole = routing_stats(model)["0"]
    report = recorder.report()["layers"]["0"]
    assert report["tokens"] == 30
    assert report["expert_load"] == pytest.approx(whole["expert_load"].tolist(), abs=1e-6)
    assert report["router_entropy"] == pytest.approx(float(whole["router_entropy"]), abs=1e-6)
    assert report["dropped_fraction"] == 0.0
    with torch.no_grad():
        model(x)  # detached: no longer counted
    assert recorder.report()["layers"]["0"]["tokens"] == 30


def test_routing_recorder_counts_drops_over_batches():
    layer = _layer(capacity_factor=0.5)
    x = torch.randn(3, 8, 8)
    recorder = RoutingRecorder().attach(layer)
    kept = requested = 0
    with torch.no_grad():
        for sample in x:
            layer(sample[None])
            stats = layer.last_routing_stats
            num_requested = 8 * 2
            kept += (1 - float(stats["dropped_fraction"])) * num_requested
            requested += num_requested
    report = recorder.report()["layers"][""]
    assert report["dropped_fraction"] == pytest.approx(1 - kept / requested, abs=1e-6)
    assert report["dropped_fraction"] > 0


def test_routing_recorder_per_class_preference_by_hand():
    layer = _layer()
    model = torch.nn.Sequential(layer)
    x = torch.randn(3, 4, 8)  # 3 images x 4 tokens
    labels = torch.tensor([1, 0, 1])
    routings = []
    layer.router.register_forward_hook(lambda module, args, out: routings.append(out))
    recorder = RoutingRecorder(num_classes=2).attach(model)
    with torch.no_grad(), recorder.labels(labels):
        model(x)
    expert = routings[0].expert_index.view(3, 4 * 2)  # [B, N * k]
    expected = torch.zeros(2, 4)
    for image, label in enumerate(labels.tolist()):
        expected[label] += torch.bincount(expert[image], minlength=4)
    expected = expected / expected.sum(1, keepdim=True)
    share = recorder.report(["zero", "one"])["layers"]["0"]["per_class"]
    assert share["classnames"] == ["zero", "one"]
    assert torch.tensor(share["expert_share"]).double() == pytest.approx(expected.double(), abs=1e-6)


def test_routing_report_files(tmp_path):
    model = mome.create_model("limoe_tiny_patch8_e4")
    recorder = RoutingRecorder(num_classes=10).attach(model)
    with torch.no_grad():
        with recorder.labels(torch.arange(4)):
            model.encode_image(torch.randn(4, 3, 32, 32))
        model.encode_text(torch.randint(1, 100, (3, 16)))
    report = recorder.report([str(c) for c in range(10)])
    layer = next(iter(report["layers"].values()))
    assert set(layer["per_modality"]) == {"image", "text"}
    assert sum(layer["per_modality"]["image"]["expert_load"]) == pytest.approx(1.0)
    written = write_routing_report(report, tmp_path)
    assert json.loads(written["json"].read_text()) == json.loads(json.dumps(report))
    for key in ("heatmap", "per_class"):
        assert written[key].read_bytes()[:8] == PNG


def test_soft_moe_layers_report_expert_load(tmp_path):
    model = mome.create_model("soft_moe_vit_tiny_patch8_e8", num_classes=10).eval()
    recorder = RoutingRecorder().attach(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    report = recorder.report()
    layer = next(iter(report["layers"].values()))
    assert layer["kind"] == "soft" and sum(layer["expert_load"]) == pytest.approx(1.0)
    assert write_routing_report(report, tmp_path)["heatmap"].read_bytes()[:8] == PNG


# ------------------------------------------------------------------------- the open_clip contract
class _TorchvisionStyle(torch.utils.data.Dataset):
    """(image, label) tuples and a ``classes`` list: the dataset shape CLIP_benchmark reads."""

    def __init__(self, samples, classes):
        self.samples, self.classes = samples, classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        return sample["image"], sample["label"]


def _digits_loader(model, tokenizer, n=40):
    datamodule = DigitsDataModule(task="classification", eval_batch_size=16)
    datamodule.bind(model, tokenizer)
    datamodule.setup("test")
    return datamodule, torch.utils.data.Subset(datamodule.datasets["test"], range(n))


def test_zero_shot_equals_clip_benchmark_on_digits():
    """CLIP_benchmark's own zero-shot evaluation runs on a mome LIMoE unchanged and gives our numbers."""
    zeroshot_classification = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    import lightning as L

    model = mome.create_model("limoe_tiny_patch8_e4", moe_kwargs={"eval_capacity_factor": None}).eval()
    task = ZeroShotClassificationTask(model, routing_report=False)
    datamodule, subset = _digits_loader(model, task.tokenizer)
    loaders = task.dataloaders(datamodule, "test", max_samples=len(subset))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.test(task, dataloaders=loaders, verbose=False)

    loader = DataLoader(_TorchvisionStyle(subset, list(datamodule.classnames)), batch_size=16)
    templates = [t.replace("{}", "{c}") for t in datamodule.templates]  # CLIP_benchmark's format
    # CLIP_benchmark's evaluate() = zero_shot_classifier + run_classification + these metrics; its accuracy()
    # helper calls float() on a 1-element array, which the installed NumPy 2 rejects, so the metrics are
    # recomputed here as it defines them (topk hits, sklearn's balanced accuracy).
    classifier = zeroshot_classification.zero_shot_classifier(
        model, task.tokenizer, list(datamodule.classnames), templates, "cpu", amp=False
    )
    logits, target = zeroshot_classification.run_classification(model, classifier, loader, "cpu", amp=False)
    from sklearn.metrics import balanced_accuracy_score

    top5 = logits.topk(5, dim=1).indices
    theirs = {
        "acc1": float((top5[:, 0] == target).float().mean()),
        "acc5": float((top5 == target[:, None]).any(1).float().mean()),
        "mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(1)),
    }
    assert task.num_samples == 40
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert task.results[name] == pytest.approx(theirs[name], abs=1e-6), name


def test_zero_shot_classifier_matches_open_clip_helper():
    """open_clip's helper on a mome model: the renormalised mean of each class's normalised prompt embeddings."""
    import open_clip

    # dropless at evaluation: a token's routing then does not depend on the other texts of its batch
    model = mome.create_model("limoe_tiny_patch8_e4", moe_kwargs={"eval_capacity_factor": None}).eval()
    task = ZeroShotClassificationTask(model, routing_report=False)
    classnames, templates = ["zero", "one", "two"], ["a {}.", "the digit {}."]
    ours = open_clip.build_zero_shot_classifier(model, task.tokenizer, classnames, templates, None)
    with torch.no_grad():
        by_hand = torch.stack(
            [
                torch.nn.functional.normalize(
                    model.encode_text(task.tokenizer([t.format(c) for t in templates]), normalize=True).mean(0), dim=0
                )
                for c in classnames
            ],
            dim=1,
        )
    assert torch.allclose(ours, by_hand, atol=1e-5)


# ---------------------------------------------------------------------------------- collect_results
def test_collect_results_csv_and_markdown(tmp_path):
    tool = _load_tool("collect_results")
    common = {"dataset": "digits", "pretrained": "none", "n_samples": 10}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "results.json").write_text(
        json.dumps({**common, "model": "m1", "task": "zeroshot_classification", "metrics": {"acc1": 0.5}})
    )
    (tmp_path / "b" / "results.json").write_text(
        json.dumps(
            {**common, "model": "m2", "task": "zeroshot_retrieval", "metrics": {"text_retrieval_recall@1": 0.25}}
        )
    )
    (tmp_path / "b" / "routing.json").write_text(json.dumps({"layers": {}}))  # not a result: skipped
    csv_path, md_path = tmp_path / "all.csv", tmp_path / "all.md"
    assert tool.main([str(tmp_path), "--csv", str(csv_path), "--markdown", str(md_path)]) == 0
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "dataset,model,pretrained,task,split,n_samples,acc1,text_retrieval_recall@1"
    assert lines[1].startswith("digits,m1,none,zeroshot_classification,,10,0.5,") and len(lines) == 3
    table = md_path.read_text().splitlines()
    assert table[2] == "| digits | m1 | none | zeroshot_classification | - | 10 | 50.00 | - |"
    assert tool.main([str(tmp_path / "nowhere")]) == 2
