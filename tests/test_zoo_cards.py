"""Zoo cards: every shipped card against the schema and the registry; user cards; saved folders and their README."""

import dataclasses
import json

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

import mome
from mome import zoo

CARDS = sorted(mome.zoo_dir().glob("*.yaml"))
CARD_IDS = [p.stem for p in CARDS]


def _card(path):
    return yaml.safe_load(path.read_text())


def test_the_zoo_covers_the_public_upstream_checkpoints():
    names = {p.stem for p in CARDS}
    for size in ("base", "base_plus", "large"):
        arch = f"vlmo_{size}_patch16_224"
        tags = {"vl4m", "stage2_text", "vl4m_ft_vqav2_480", "vl4m_ft_nlvr2_384", "vl4m_ft_coco_384", "vl4m_ft_f30k_384"}
        assert {f"{arch}.{t}" for t in tags} <= names
    for llm in ("stablelm_1_6b", "qwen_1_8b", "phi2_2_7b"):
        assert {f"moe_llava_{llm}_e4.{t}" for t in ("moe_tuned", "stage2_dense", "stage1_projector")} <= names
    assert {
        "vmoe_s32_e8.in1k_randaug_light1",
        "vmoe_s32_e8.in1k_randaug_light1_ft_in1k_384",
        "vmoe_s32_e8.in1k_randaug_medium",
        "vmoe_b16_e8.in21k_randaug_strong",
        "vmoe_b16_e8.in21k_randaug_strong_ft_in1k_384",
    } <= names
    unreleased = ("limoe_", "soft_moe_vit", "vl_moe_")  # no public weights: no card but upcycled dense ones
    assert not any(n.startswith(unreleased) and "upcycled" not in n for n in names)


def test_schema_covers_every_pretrained_cfg_field():
    fields = {f.name for f in dataclasses.fields(mome.PretrainedCfg)}
    assert set(zoo.CARD_SCHEMA) - {"default"} == fields


def test_schema_converters_and_formats_are_the_one_table_of_mome_convert():
    from mome import convert

    assert set(zoo.CONVERTERS) == set(convert.CONVERTERS) and set(zoo.SOURCE_FORMATS) == set(convert.READERS)
    for name in zoo.CONVERTERS:
        assert callable(convert.CONVERTERS[name]), name  # every converter a card may name resolves
    for name in zoo.SOURCE_FORMATS:
        assert callable(convert.READERS[name]), name
    with pytest.raises(KeyError, match="unknown converter 'nope'"):
        convert.CONVERTERS["nope"]


@pytest.mark.parametrize("path", CARDS, ids=CARD_IDS)
def test_every_card_is_valid_and_registered(path):
    data = _card(path)
    assert zoo.validate_card(data, path) == []
    name, cfg, default = zoo.read_card(path)
    assert name == path.stem == f"{data['architecture']}.{data['tag']}"
    assert cfg.source_format in zoo.SOURCE_FORMATS and (cfg.converter in zoo.CONVERTERS) == cfg.needs_conversion()
    if cfg.sha256 is not None:
        assert len(cfg.sha256) == 64 and int(cfg.sha256, 16) >= 0
    assert cfg.has_weights() and cfg.license
    assert cfg.paper_ids or (cfg.paper_name and cfg.origin_url)  # a release with no arXiv paper names its report
    assert mome.is_model(cfg.architecture)
    assert name in mome.list_pretrained(cfg.architecture)
    registered = mome.get_pretrained_cfg(name)
    assert registered == cfg
    if default:
        assert mome.get_pretrained_cfg(cfg.architecture).tag == cfg.tag


@pytest.mark.parametrize("path", CARDS, ids=CARD_IDS)
def test_card_model_kwargs_build_the_architecture(path):
    name, cfg, _ = zoo.read_card(path)
    overlay = {}
    if cfg.source_format == "transformers":  # the architecture is the repo's config.json: the fixture's, offline
        from fidelity import fixture_dir

        from mome.models.hf_moe_vlm import RELEASED

        overlay = dict(file=str(fixture_dir(f"hf_{RELEASED[cfg.architecture][0]}") / "model"))
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = mome.create_model(name, pretrained_cfg_overlay=overlay)
    assert model.mome_model_args == cfg.model_kwargs
    assert model.pretrained_cfg.tag == cfg.tag and model.pretrained_cfg.input_size == cfg.input_size
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        assert tuple(patch_embed.img_size) == tuple(cfg.input_size[1:]), name
    if cfg.num_classes is not None:
        assert model.num_classes == cfg.num_classes


def _valid_card(**changes):
    card = {
        "architecture": "_test_zoo_mlp",
        "tag": "t",
        "url": "https://example.com/w.safetensors",
        "source_format": "mome",
        "input_size": [3, 8, 8],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "license": "apache-2.0",
    }
    card.update(changes)
    return {k: v for k, v in card.items() if v is not None}


@pytest.mark.parametrize(
    ("changes", "field", "problem"),
    [
        ({"colour": "red"}, "colour", "unknown field"),
        ({"license": None}, "license", "required"),
        ({"sha256": "abc"}, "sha256", "64 lower-case hex"),
        ({"sha256": "A" * 64}, "sha256", "64 lower-case hex"),
        ({"source_format": "onnx"}, "source_format", "one of"),
        ({"source_format": "vmoe"}, "converter", "needs one of"),
        ({"source_format": "vmoe", "converter": "magic"}, "converter", "one of"),
        ({"url": None}, "hf_hub_id", "no weight source"),
        ({"url": "ftp://x/y"}, "url", "http(s)"),
        ({"hf_hub_id": "not a repo"}, "hf_hub_id", "repo id"),
        ({"hf_hub_filename": "w.bin"}, "hf_hub_filename", "needs hf_hub_id"),
        ({"input_size": [3, 8]}, "input_size", "3 positive integers"),
        ({"crop_pct": 1.5}, "crop_pct", "(0, 1]"),
        ({"results": {"ImageNet": {"top1": "high"}}}, "results", "numbers"),
        ({"model_kwargs": {"not a name": 1}}, "model_kwargs", "keyword"),
        ({"tag": "Bad-Tag"}, "tag", "snake_case"),
        ({"num_classes": True}, "num_classes", "must be int"),
    ],
)
def test_schema_errors_name_the_field(changes, field, problem):
    errors = zoo.validate_card(_valid_card(**changes), "card.yaml")
    assert errors, changes
    assert any(e.field == field and problem in e.problem for e in errors), [str(e) for e in errors]
    assert all(str(e).startswith("card.yaml: ") for e in errors)


def test_card_file_must_be_named_after_arch_tag_and_local_files_must_exist(tmp_path):
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump(_valid_card()))
    with pytest.raises(zoo.CardError, match=r"wrong.yaml: .*_test_zoo_mlp.t.yaml"):
        zoo.read_card(path)
    path = tmp_path / "_test_zoo_mlp.t.yaml"
    path.write_text(yaml.safe_dump(_valid_card(url=None, file="absent.safetensors")))
    with pytest.raises(zoo.CardError, match="'file'.*absent.safetensors"):
        zoo.read_card(path)
    assert zoo.validate_card(["a", "list"], "x.yaml")[0].problem.startswith("a card is a YAML mapping")


@mome.register_model
def _test_zoo_mlp(pretrained: bool = False, dim: int = 4, hidden: int = 8):
    model = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 3))
    model.pretrained_cfg = mome.PretrainedCfg(notes="entrypoint defaults")
    return model


def test_user_zoo_dir_cards_load_through_create_model(tmp_path):
    source = mome.create_model("_test_zoo_mlp", hidden=5)
    save_file({k: v.clone() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    card = _valid_card(url=None, file="w.safetensors", tag="user", default=True, model_kwargs={"hidden": 5})
    (tmp_path / "_test_zoo_mlp.user.yaml").write_text(yaml.safe_dump(card))
    (tmp_path / "_test_zoo_pending_arch.later.yaml").write_text(
        yaml.safe_dump(_valid_card(architecture="_test_zoo_pending_arch", tag="later"))
    )
    assert sorted(mome.add_zoo_dir(tmp_path)) == ["_test_zoo_mlp.user", "_test_zoo_pending_arch.later"]
    assert mome.list_pretrained("_test_zoo_mlp") == ["_test_zoo_mlp.user"]
    assert mome.get_pretrained_cfg("_test_zoo_mlp").file == str((tmp_path / "w.safetensors").resolve())

    model = mome.create_model("_test_zoo_mlp", pretrained=True)
    assert model[0].out_features == 5 and model.mome_model_args == {"hidden": 5}
    for key, value in model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    assert model.pretrained_cfg.tag == "user" and model.pretrained_cfg.license == "apache-2.0"

    # a card whose architecture is registered later is picked up then
    assert not mome.list_pretrained("_test_zoo_pending_arch")

    @mome.register_model
    def _test_zoo_pending_arch(pretrained: bool = False):
        return nn.Linear(2, 2)

    assert mome.list_pretrained("_test_zoo_pending_arch") == ["_test_zoo_pending_arch.later"]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        mome.add_zoo_dir(tmp_path / "nope")


def test_a_foreign_card_is_converted_and_loaded_exactly(tmp_path):
    pytest.importorskip("mome.convert")
    from timm.models.vision_transformer import VisionTransformer

    dense = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    save_file(dense.state_dict(), tmp_path / "vit.safetensors")
    overlay = {"file": str(tmp_path / "vit.safetensors"), "source_format": "timm", "converter": "timm_vit"}
    model = mome.create_model("vmoe_tiny_patch8_e4", pretrained=True, pretrained_cfg_overlay=overlay, act_layer="gelu")
    state = model.state_dict()
    assert torch.equal(state["blocks.0.attn.qkv.weight"], dense.blocks[0].attn.qkv.weight)
    assert torch.equal(state["blocks.0.mlp.fc1.weight"], dense.blocks[0].mlp.fc1.weight)
    w_in, fc1 = state["blocks.1.mlp.experts.w_in"], dense.blocks[1].mlp.fc1.weight.detach()
    for expert in range(w_in.shape[0]):  # every expert a copy of the dense MLP (in either weight layout)
        assert torch.equal(w_in[expert], fc1) or torch.equal(w_in[expert], fc1.T), expert


# --- saved folders: README card, tokenizer files, round trip ----------------------------------------------


@mome.register_model(
    pretrained_cfgs={
        "card*": {
            "license": "mit",
            "paper_ids": "arXiv:2111.02358",
            "paper_name": "A paper",
            "url": "https://example.com/w.pt",
            "source_format": "unilm_vlmo",
            "converter": "unilm_vlmo",
            "results": {"VQAv2 test-dev": {"accuracy": 76.6}, "COCO 5k test": {"TR@1": 74.8, "IR@1": 57.2}},
            "model_kwargs": {"hidden": 7},
        }
    }
)
def _test_zoo_card_mlp(pretrained: bool = False, hidden: int = 8):
    return nn.Sequential(nn.Linear(4, hidden), nn.Linear(hidden, 2))


def _front_matter(text):
    assert text.startswith("---\n")
    meta, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(meta), body


def test_save_pretrained_writes_a_model_card_and_round_trips_exactly(tmp_path):
    assert mome.create_model("_test_zoo_card_mlp").mome_model_args == {}  # a bare arch keeps its defaults
    model = mome.create_model("_test_zoo_card_mlp.card")  # the named tag's model: its card's model_kwargs
    assert model.mome_model_args == {"hidden": 7} and model[0].out_features == 7
    folder = mome.save_pretrained(model, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    assert sorted(config["files"]) == sorted(p.name for p in folder.iterdir())
    meta, body = _front_matter((folder / "README.md").read_text())
    assert meta["library_name"] == "mome" and meta["license"] == "mit" and "mome" in meta["tags"]
    assert "# _test_zoo_card_mlp.card" in body and 'mome.create_model("local-dir:' in body
    assert "| VQAv2 test-dev | accuracy | 76.6 |" in body and "| COCO 5k test | IR@1 | 57.2 |" in body
    assert '"hidden": 7' in body and "https://example.com/w.pt" in body and "arXiv:2111.02358" in body

    loaded = mome.create_model(f"local-dir:{folder}")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.pretrained_cfg.results == model.pretrained_cfg.results
    # the Hub README names the repo it loads from
    mome.save_pretrained(loaded, folder, repo_id="org/name")
    assert 'mome.create_model("hf-hub:org/name")' in (folder / "README.md").read_text()


def _tiny_hf_tokenizer(folder):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(str(folder))
    return folder


def test_save_pretrained_writes_the_hf_tokenizer_files(tmp_path):
    tokenizer_dir = _tiny_hf_tokenizer(tmp_path / "tok")
    model = mome.create_model("_test_zoo_card_mlp", pretrained_cfg_overlay={"tokenizer": f"hf-hub:{tokenizer_dir}"})
    folder = mome.save_pretrained(model, tmp_path / "out")
    files = json.loads((folder / "config.json").read_text())["files"]
    assert "tokenizer_config.json" in files and set(files) == {p.name for p in folder.iterdir()}
    from transformers import BertTokenizerFast

    # (AutoTokenizer would read the folder's config.json, which is mome's, not a transformers config)
    reloaded = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    assert reloaded("a cat")["input_ids"] == [2, 5, 6, 3]
    mome.save_pretrained(model, folder)  # a re-save replaces every file the first one wrote

    missing = mome.create_model("_test_zoo_card_mlp", pretrained_cfg_overlay={"tokenizer": "hf-hub:mome-test/no-tok"})
    with pytest.warns(UserWarning, match="tokenizer files not written"):
        folder = mome.save_pretrained(missing, tmp_path / "out2")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
