"""The zoo cards of transformers' MoE VLMs (``zoo/<released name>.<tag>.yaml``, format ``transformers``): the
card's repo and revision go through huggingface_hub's cache offline; the three bad inputs (a family the installed
transformers lacks, a revision missing offline, a processor that does not fit the model) are one-line typed
errors naming the card and what is missing. Outputs against transformers: ``tests/test_fidelity_hf_moe_vlm.py``."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from fidelity import fixture_dir

import mome
from mome import zoo

transformers = pytest.importorskip("transformers")
from mome.models import hf_moe_vlm as H  # noqa: E402

CARD = "qwen3_vl_moe_30b_a3b.instruct"
REPO = "Qwen/Qwen3-VL-30B-A3B-Instruct"
CONFIG = fixture_dir("hf_qwen3_vl_moe") / "model" / "config.json"  # a qwen3_vl_moe config.json transformers wrote
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def _offline(monkeypatch, cache):
    """Offline, with ``cache`` as huggingface_hub's cache (HF_HUB_CACHE)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def _cache_repo(cache, commit: str, files: dict) -> None:
    """The Hub cache's layout of ``REPO`` at ``commit`` (``refs/main`` -> ``commit``), holding ``files``."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)


def test_every_released_name_has_a_default_transformers_card():
    for arch, (_, repo) in H.RELEASED.items():
        cfg = mome.get_pretrained_cfg(arch)
        assert (cfg.architecture, cfg.hf_hub_id, cfg.source_format) == (arch, repo, "transformers"), arch
        assert cfg.revision and cfg.converter is None and not cfg.needs_conversion() and cfg.is_whole_repo()


@pytest.mark.parametrize(
    ("changes", "field", "problem"),
    [
        ({"converter": "moe_llava"}, "converter", "needs none"),
        ({"hf_hub_filename": "model.safetensors"}, "hf_hub_id", "whole repo"),
        ({"revision": "not a revision!"}, "revision", "40-hex commit"),
        ({"hf_hub_id": None, "url": "https://example.com/w.safetensors"}, "hf_hub_id", "whole repo"),
        ({"sha256": "0" * 64}, "sha256", "no single sha256"),
        ({"license": None}, "license", "required"),
    ],
)
def test_the_transformers_card_schema(changes, field, problem):
    import yaml

    card = yaml.safe_load((mome.zoo_dir() / f"{CARD}.yaml").read_text())
    assert zoo.validate_card(card) == []  # no preprocessing fields: the processor holds them
    card = {k: v for k, v in {**card, **changes}.items() if v is not None}
    errors = zoo.validate_card(card)
    assert any(e.field == field and problem in e.problem for e in errors), [str(e) for e in errors]


def test_the_card_builds_from_the_cached_config_at_its_revision_offline(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    _cache_repo(tmp_path, COMMIT, {"config.json": CONFIG})
    model = mome.create_model(CARD)  # the card's revision (main) resolves to the cached commit; random weights
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert model.config.text_config.num_experts == 4 and model.pretrained_cfg.tag == "instruct"
    pinned = mome.create_model(CARD, pretrained_cfg_overlay=dict(revision=COMMIT))  # the commit itself
    assert pinned.config.to_dict() == model.config.to_dict()


def test_a_revision_missing_offline_names_the_card_and_the_revision(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)  # an empty cache
    for pretrained, what in ((True, "weights"), (False, "config.json")):
        with pytest.raises(mome.PretrainedUnavailableError) as err:
            mome.create_model(CARD, pretrained=pretrained)
        text = _one_line(err)
        assert text.startswith(f"{CARD}: its {what}") and f"{REPO} at revision main" in text
    _cache_repo(tmp_path, COMMIT, {"config.json": CONFIG})  # the repo is cached, but at another commit
    other = "f" * 40
    with pytest.raises(mome.PretrainedUnavailableError) as err:
        mome.create_model(CARD, pretrained_cfg_overlay=dict(revision=other))
    assert f"{REPO} at revision {other}" in _one_line(err) and f"--revision {other}" in str(err.value)


@pytest.mark.parametrize("pretrained", [True, False])
def test_a_family_the_installed_transformers_lacks_names_the_card_and_fetches_nothing(
    monkeypatch, tmp_path, pretrained
):
    _offline(monkeypatch, tmp_path)
    _cache_repo(tmp_path, COMMIT, {"config.json": CONFIG})
    fetched = []
    monkeypatch.setattr(mome._hub, "_fetch", lambda *a, **k: fetched.append(a))
    # transformers without qwen3_vl_moe: importing its modeling module fails
    monkeypatch.setitem(sys.modules, "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", None)
    with pytest.raises(mome.UnsupportedModelError) as err:
        mome.create_model(CARD, pretrained=pretrained)
    text = _one_line(err)
    assert text.startswith(f"{CARD}: the installed transformers {transformers.__version__} has no Qwen3VLMoe")
    assert "'qwen3_vl_moe'" in text and fetched == []
    with pytest.raises(mome.UnsupportedModelError, match=f"^{CARD}: the installed transformers"):
        H.load_processor(CARD)


def _processor(image_id: int = 100, extra_tokens: int = 0):
    """A Qwen3-VL processor over a tiny word-level tokenizer; its ``<|image_pad|>`` is id ``image_id``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    words = [f"w{i}" for i in range(100 + extra_tokens)]
    specials = {"<|image_pad|>": image_id, "<|video_pad|>": 101, "<|vision_start|>": 102, "<|vision_end|>": 103}
    vocab = {w: i for i, w in enumerate(words) if i not in specials.values()} | specials
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")
    return Qwen3VLProcessor(Qwen2VLImageProcessor(), tokenizer, Qwen3VLVideoProcessor())


def _repo_folder(tmp_path, processor):
    folder = tmp_path / "repo"
    processor.save_pretrained(folder)
    shutil.copy(CONFIG, folder / "config.json")
    return folder


def test_the_card_processor_loads_and_fits_the_model(tmp_path):
    folder = _repo_folder(tmp_path, _processor())
    processor = H.load_processor(CARD, pretrained_cfg_overlay=dict(file=str(folder)))
    assert type(processor).__name__ == "Qwen3VLProcessor" and processor.image_token_id == 100


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"image_id": 99}, "its image token '<|image_pad|>' is id 99, config.image_token_id is 100"),
        ({"extra_tokens": 40}, "its tokenizer has 140 tokens, the model's embedding 128"),
    ],
)
def test_a_processor_that_does_not_fit_the_model_names_the_card_and_the_field(tmp_path, kwargs, problem):
    folder = _repo_folder(tmp_path, _processor(**kwargs))
    with pytest.raises(mome.ProcessorMismatchError) as err:
        H.load_processor(CARD, pretrained_cfg_overlay=dict(file=str(folder)))
    assert _one_line(err) == f"{CARD}: the processor does not fit the model: {problem}"
    # the same check on a model in memory (a tiny config of the family)
    with pytest.raises(mome.ProcessorMismatchError, match="does not fit"):
        H.check_processor(_processor(**kwargs), H.tiny_config("qwen3_vl_moe"), "qwen3_vl_moe_tiny")


def test_the_zoo_command_line_lists_downloads_and_refuses_to_convert(monkeypatch, tmp_path, capsys):
    _offline(monkeypatch, tmp_path)
    assert zoo.main(["list", "qwen3_vl*"]) == 0
    assert capsys.readouterr().out.split("\t")[1:] == ["transformers", f"hf-hub:{REPO}@main\n"]
    assert zoo.main(["download", CARD, "--cache-dir", str(tmp_path)]) == 2  # offline, not cached: one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{REPO} at revision main" in err
    assert zoo.main(["convert", CARD, "--out", str(tmp_path / "out")]) == 2
    assert "a transformers card is not converted" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_transformers_folder_route_and_no_half_written_mome_folder(tmp_path):
    """A card's model saves with transformers' own save_pretrained and reloads through the card with file=;
    mome.save_pretrained refuses it (its folder could not rebuild the model) and writes nothing."""
    model = mome.create_model(CARD, pretrained=True, pretrained_cfg_overlay=dict(file=str(CONFIG.parent)))
    model.save_pretrained(tmp_path / "hf")
    again = mome.create_model(CARD, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "hf")))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(mome.UnsupportedModelError, match=f"^save_pretrained: {CARD.split('.')[0]} is built from"):
        mome.save_pretrained(model, tmp_path / "mome")
    assert not (tmp_path / "mome").exists()
    with pytest.raises(mome.InvalidArgumentError, match=r"build it with mome.create_model\('qwen3_vl_moe_30b_a3b'\)"):
        mome.model_entrypoint("qwen3_vl_moe_30b_a3b")()  # the entrypoint alone: no card
