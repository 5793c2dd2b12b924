"""LIMoE with a third modality (``audio=True``): audio patch embedding, modality id 2 through the shared tower, the
per-modality MoE losses over three modalities, the three-pair contrastive loss, the audio-aware evaluation tasks,
typed errors, and (slow) the header commands of ``conf/experiment/limoe_digits_audio.yaml`` end to end."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from train_helpers import CONF

import mome
from mome import get_tokenizer
from mome.data import DigitsDataModule
from mome.layers import MoE
from mome.lit import ContrastiveTask, RetrievalTask, ZeroShotClassificationTask
from mome.lit.base import TaskConfigError
from mome.models.limoe import LIMoE

TRI = "limoe_audio_tiny_patch8_e4"
BI = "limoe_tiny_patch8_e4"
CAPTIONS = ["a photo of a cat", "a dog", "the digit seven."]


@pytest.fixture(scope="module")
def tokens():
    return get_tokenizer(TRI)(CAPTIONS)


def _inputs(batch: int = 3):
    return torch.randn(batch, 3, 32, 32), torch.randn(batch, 80, 100)


def _capture_routing(model):
    """The Routing of every router call of ``model``'s MoE layers, by layer name (a forward hook each)."""
    calls: dict[str, list] = {}
    handles = [
        module.router.register_forward_hook(lambda mod, args, out, name=name: calls.setdefault(name, []).append(out))
        for name, module in model.named_modules()
        if isinstance(module, MoE)
    ]
    return calls, handles


def test_variant_shapes_names_and_unit_features(tokens):
    model = mome.create_model(TRI)
    assert isinstance(model, LIMoE) and model.modality_names == ("image", "text", "audio")
    assert model.audio_embed.proj.in_channels == 1 and model.audio_embed.grid_size == (5, 5)  # 16 x 20 patches
    assert model.audio_pos_embed.shape == (1, 25, 64) and model.audio_size == (80, 100)
    assert all(layer.num_modalities == 3 for layer in model.modules() if isinstance(layer, MoE))
    images, audio = _inputs()
    image, text, sound, scale = model(images, tokens, audio)
    for features in (image, text, sound):
        assert features.shape == (3, 64)
        torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(scale, torch.tensor(1 / 0.07))
    assert model.encode_audio(audio).shape == (3, 64)
    assert len(model(images, tokens)) == 3  # without audio: open_clip's (image, text, logit_scale)
    model.output_dict = True
    out = model(images, tokens, audio)
    assert set(out) == {"image_features", "text_features", "audio_features", "logit_scale"}
    assert set(model(images, tokens)) == {"image_features", "text_features", "logit_scale"}
    # the two-modality LIMoE's parameters are the tri-modal one's without the audio input and head
    bi_names = set(mome.create_model(BI).state_dict())
    tri_names = set(model.state_dict())
    assert tri_names - bi_names == {
        "audio_embed.proj.weight",
        "audio_embed.proj.bias",
        "audio_pos_embed",
        "audio_norm.weight",
        "audio_norm.bias",
        "audio_proj.weight",
        "audio_proj.bias",
    }
    assert bi_names < tri_names


def test_modality_ids_reach_one_moe_call_per_layer(tokens):
    model = mome.create_model(TRI)
    calls, handles = _capture_routing(model)
    images, audio = _inputs()
    model(images, tokens, audio)
    for handle in handles:
        handle.remove()
    real_text = int((tokens != 0).sum())  # padding is not routed
    for name, routings in calls.items():
        assert len(routings) == 1, name  # the three streams in one MoE call
        ids = routings[0].modality_ids
        assert ids.tolist() == [0] * (3 * 16) + [1] * real_text + [2] * (3 * 25), name
    stats = mome.routing_stats(model)
    for layer_stats in stats.values():
        load = layer_stats["expert_load_per_modality"]  # [3, E]
        assert load.shape == (3, 4)
        torch.testing.assert_close(load.sum(-1), torch.ones(3))


def test_streams_alone_match_the_joint_pass(tokens):
    """Dropless and without noise each token's output does not depend on the tokens routed with it, so the audio
    stream alone (encode_audio) and each stream of the joint three-modality pass agree, forward and backward."""
    model = mome.create_model(TRI, moe_kwargs={"capacity_factor": None}).eval()
    images, audio = _inputs()
    audio.requires_grad_(True)
    image, text, sound, _ = model(images, tokens, audio)
    (grad_joint,) = torch.autograd.grad(sound.sum(), audio)
    alone = model.encode_audio(audio, normalize=True)
    load = mome.routing_stats(model)["blocks.1.mlp"]["expert_load_per_modality"]  # the audio stream alone
    assert load[:2].sum() == 0 and load[2].sum() == pytest.approx(1.0)
    (grad_alone,) = torch.autograd.grad(alone.sum(), audio)
    torch.testing.assert_close(alone, sound)
    torch.testing.assert_close(grad_alone, grad_joint)
    torch.testing.assert_close(model.encode_image(images, normalize=True), image)
    torch.testing.assert_close(model.encode_text(tokens, normalize=True), text)


def test_per_modality_losses_match_a_hand_computation(tokens):
    """Each MoE layer's weighted losses over the image, text and audio tokens of one call, recomputed from the
    router probabilities the layer saw: importance CV^2 over all tokens, the local entropy summed over the three
    modalities' mean token entropies, the global entropy max(0, tau - H(mean p)) summed over the modalities (tau = 2
    nats, above log 4, so that every modality's term is positive at initialisation)."""
    tau = 2.0
    model = mome.create_model(TRI, moe_kwargs={"global_entropy_threshold": tau})
    calls, handles = _capture_routing(model)
    images, audio = _inputs()
    model(images, tokens, audio)
    for handle in handles:
        handle.remove()
    for name, layer in model.named_modules():
        if not isinstance(layer, MoE):
            continue
        routing = calls[name][0]
        probs, ids = routing.router_probs.double(), routing.modality_ids
        entropy = -(probs * probs.log()).sum(-1)  # [T]
        importance = probs.sum(0)
        expected_importance = 0.005 * importance.var(unbiased=False) / importance.mean() ** 2
        local, global_ = 0.0, 0.0
        for m in range(3):
            mine = ids == m
            assert mine.any()
            local += entropy[mine].mean()
            marginal = probs[mine].mean(0)
            term = tau + float((marginal * marginal.log()).sum().detach())
            assert term > 0
            global_ += term
        selection = routing.selection_probs.double().mean(0)
        expected = {
            "importance": expected_importance,
            "load": 0.005 * selection.var(unbiased=False) / selection.mean() ** 2,
            "local_entropy": 0.01 * local,
            "global_entropy": torch.tensor(0.01 * global_, dtype=torch.float64),
        }
        got = {k: v.double() for k, v in layer.last_aux_losses.items()}
        assert set(got) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7, msg=f"{name} {key}")


def test_without_audio_the_tri_modal_model_is_the_two_modality_one(tokens):
    """The image-text LIMoE's weights in the tri-modal model: the same features and the same aux losses on image and
    text (no audio token: the audio terms of the per-modality losses are 0), forward and backward."""
    bi = mome.create_model(BI).eval()
    tri = mome.create_model(TRI).eval()
    missing, unexpected = tri.load_state_dict(bi.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("audio_") for k in missing)
    images = torch.randn(3, 3, 32, 32)
    outs = [model(images, tokens) for model in (bi, tri)]
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b)
    losses = [mome.aux_losses(model) for model in (bi, tri)]
    assert set(losses[0]) == set(losses[1])
    for key in losses[0]:
        torch.testing.assert_close(losses[0][key], losses[1][key])
    for out, loss in zip(outs, losses):
        (out[0] @ out[1].T).sum().add(sum(loss.values())).backward()
    for name, param in bi.named_parameters():
        torch.testing.assert_close(param.grad, tri.get_parameter(name).grad, msg=name)


def test_contrastive_task_sums_the_three_pairs(tokens):
    task = ContrastiveTask(model={"model_name": TRI})
    task.clip_loss = ClipLoss()  # what setup() builds on one process
    images, audio = _inputs()
    batch = {"image": images, "text": tokens, "audio": audio}
    torch.manual_seed(1)
    total = task._loss(batch, "train")
    torch.manual_seed(1)  # the same router noise
    image, text, sound, scale = task.model(images, tokens, audio)
    labels = torch.arange(3)

    def info_nce(a, b):
        logits = scale * a @ b.T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    expected = info_nce(image, text) + info_nce(sound, text) + info_nce(sound, image)
    expected = expected + sum(mome.aux_losses(task.model).values())
    torch.testing.assert_close(total, expected)
    with pytest.raises(TaskConfigError, match="batches need 'audio'"):
        task._loss({"image": images, "text": tokens}, "train")


def test_contrastive_task_needs_audio_data():
    task = ContrastiveTask(model={"model_name": TRI})
    with pytest.raises(TaskConfigError, match="data.task=image_text_audio"):
        task.check_datamodule(DigitsDataModule(task="image_text"))
    task.check_datamodule(DigitsDataModule(task="image_text_audio"))
    ContrastiveTask(model={"model_name": BI}).check_datamodule(DigitsDataModule(task="image_text"))


def test_bad_audio_and_modalities_are_typed_errors():
    model = mome.create_model(TRI)
    for bad, got in (
        (torch.randn(2, 80, 99), r"shape \(2, 80, 99\)"),
        (torch.randn(80, 100), r"shape \(80, 100\)"),
        (torch.randn(2, 1, 80, 100), r"shape \(2, 1, 80, 100\)"),
    ):
        with pytest.raises(mome.InvalidInputError, match=r"audio must be log-mel features \[B, 80, 100\].*" + got):
            model.encode_audio(bad)
    with pytest.raises(mome.InvalidInputError, match="floating-point"):
        model.encode_audio(torch.zeros(2, 80, 100, dtype=torch.long))
    with pytest.raises(mome.InvalidInputError, match="modalities are image and text"):
        mome.create_model(BI).encode_audio(torch.randn(2, 80, 100))
    with pytest.raises(mome.InvalidInputError, match="image, text, audio"):
        model()
    # a modality id outside the model's three: the MoE layers refuse it
    layer = model.blocks[1].mlp
    with pytest.raises(mome.InvalidInputError, match=r"modality_ids must be ids in \[0, 3\) .*got ids \[3\]"):
        layer(torch.randn(1, 4, 64), torch.tensor([[0, 1, 2, 3]]))
    with pytest.raises(mome.InvalidArgumentError, match="num_modalities"):
        mome.create_model(TRI, moe_kwargs={"num_modalities": 2})
    with pytest.raises(mome.InvalidArgumentError, match="audio_size"):
        mome.create_model(TRI, audio_size=(80, 90))
    with pytest.raises(mome.InvalidArgumentError, match="num_experts"):
        mome.create_model(TRI, moe_type="modality_pools", num_experts=2)
    with pytest.raises(mome.InvalidArgumentError, match="experts_per_modality"):
        mome.create_model(TRI, moe_type="modality_pools", moe_kwargs={"experts_per_modality": {"image": 2, "text": 2}})


def test_other_moe_types_route_three_modalities(tokens):
    images, audio = _inputs()
    pools = mome.create_model(TRI, moe_type="modality_pools", num_experts=5)
    assert pools.blocks[1].mlp.modality_names == ["image", "text", "audio"]
    assert pools.blocks[1].mlp.router.allowed_experts.sum(-1).tolist() == [2, 2, 1]  # 5 experts in three pools
    assert pools(images, tokens, audio)[2].shape == (3, 64)
    soft = mome.create_model(TRI, moe_type="soft")  # per modality: no modality ids
    assert soft(images, tokens, audio)[2].shape == (3, 64)


def test_eval_tasks_choose_modalities():
    bi, tri = mome.create_model(BI), mome.create_model(TRI)
    audio_data, image_data = DigitsDataModule(task="image_text_audio"), DigitsDataModule(task="image_text")
    task = ZeroShotClassificationTask(tri)
    from mome.lit.eval_tasks import _input_modalities

    known = task.input_modalities
    assert _input_modalities(tri, audio_data, None, known, "zero_shot") == ["image", "audio"]
    assert _input_modalities(tri, image_data, None, known, "zero_shot") == ["image"]
    assert _input_modalities(bi, audio_data, None, known, "zero_shot") == ["image"]
    assert _input_modalities(tri, audio_data, ["audio"], known, "zero_shot") == ["audio"]
    with pytest.raises(TaskConfigError, match="modalities are image, text"):
        _input_modalities(bi, audio_data, ["audio"], known, "zero_shot")
    with pytest.raises(mome.data.DataConfigError, match="data.task=image_text_audio"):
        _input_modalities(tri, image_data, ["image", "audio"], known, "zero_shot")
    with pytest.raises(TaskConfigError, match="distinct names"):
        _input_modalities(tri, audio_data, ["text"], known, "zero_shot")
    with pytest.raises(TaskConfigError, match="image and text"):
        RetrievalTask(tri, modalities=["audio", "text"])


# ------------------------------------------------------------------------------------------------ end to end
def _header(name: str) -> list[list[str]]:
    """The commands of the header of ``experiment=<name>`` (lines 2-4: mome-train, then the mome-eval ones)."""
    lines = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()[1:4]
    assert lines[0].startswith(f"# mome-train experiment={name}") and all("# mome-eval " in x for x in lines[1:])
    return [shlex.split(line.removeprefix("# ").split("  (")[0])[1:] for line in lines]


@pytest.mark.slow
def test_limoe_digits_audio_header_commands_run_end_to_end(tmp_path):
    """``mome-train experiment=limoe_digits_audio`` (shortened), then the header's two ``mome-eval`` commands on
    the export: zero-shot from image and audio, retrieval between the three, and routing reports whose
    per-modality expert loads sum to one for image, text and audio."""
    from test_experiments import EVAL_SHORT, SHORT, _substitute, compose_run

    from mome.cli.eval import evaluate
    from mome.cli.train import train

    train_words, *eval_commands = _header("limoe_digits_audio")
    cfg = compose_run(tmp_path, [*train_words, *SHORT, "trainer.max_steps=3", "data.batch_size=8"])
    metrics, objects = train(cfg)
    assert "train/contrastive_audio_image" in metrics and "test/zeroshot_audio_top1" in metrics, sorted(metrics)
    export = Path(objects["export_dir"])
    values = {"<run>": str(export.parent)}
    records = {}
    for words in eval_commands:
        eval_dir = tmp_path / "eval" / str(len(records))
        overrides = [*_substitute(words, values), *EVAL_SHORT, "max_samples=20", f"hydra.run.dir={eval_dir}"]
        record, _ = evaluate(compose_run(tmp_path, overrides, config_name="eval"))
        assert json.loads((eval_dir / "results.json").read_text()) == record
        routing = json.loads((eval_dir / "routing.json").read_text())
        for layer, entry in routing["layers"].items():
            assert set(entry["per_modality"]) == {"image", "text", "audio"}, layer
            for modality, values_m in entry["per_modality"].items():
                assert sum(values_m["expert_load"]) == pytest.approx(1.0), (layer, modality)
                assert values_m["tokens"] > 0
        records[record["task"]] = record
    zero_shot, retrieval = records["zeroshot_classification"], records["zeroshot_retrieval"]
    assert zero_shot["n_samples"] == 20 and zero_shot["protocol"]["modalities"] == ["image", "audio"]
    assert {"acc1", "acc5", "audio_acc1", "audio_acc5"} <= set(zero_shot["metrics"])
    pairs = ("audio_to_text", "text_to_audio", "audio_to_image", "image_to_audio")
    names = {f"{p}_recall@{k}" for p in pairs for k in (1, 5, 10)}
    names |= {f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10)}
    assert set(retrieval["metrics"]) == names
    assert all(0.0 <= v <= 1.0 for v in [*zero_shot["metrics"].values(), *retrieval["metrics"].values()])
    assert retrieval["protocol"]["audio_image_positives"] == "same class"
