"""Registry and factory: timm-style names, listing, cards, exact checkpoint loading, saved folders."""

import hashlib
import json
import pathlib
import warnings

import pytest
import timm.data
import torch
from torch import nn

import mome
from mome.layers import SparseMoE

# --- test entrypoints (unique names; the registry is process-global) -------------------------------


@mome.register_model(
    pretrained_cfgs={
        "scratch": {"num_classes": 4, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": [3, 8, 8]},
        "in1k_file*": {"file": "/nonexistent/mlp.safetensors", "num_classes": 4, "license": "apache-2.0"},
        "jft_vmoe": {"hf_hub_id": "google/vmoe-test", "source_format": "vmoe", "converter": "vmoe"},
        "hub": {"hf_hub_id": "mome-test/does-not-exist-anywhere"},
        "web": {"url": "https://example.com/w.safetensors"},
    }
)
def _test_tiny_mlp_registry(pretrained: bool = False, dim: int = 8, hidden: int = 16, num_classes: int = 4, act="gelu"):
    act_layer = {"gelu": nn.GELU, "relu": nn.ReLU}[act]
    model = nn.Sequential(nn.Linear(dim, hidden), act_layer(), nn.Linear(hidden, num_classes))
    model.seen_pretrained = pretrained
    return model


class _TinyMoE(nn.Module):
    def __init__(self, dim: int = 8, num_experts: int = 4):
        super().__init__()
        self.moe = SparseMoE(dim, 16, num_experts, 2)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.moe(x))


@mome.register_model
def _test_tiny_moe_registry(pretrained: bool = False, **kwargs):
    return _TinyMoE(**kwargs)


@mome.register_model
def _test_tied_registry(pretrained: bool = False):
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    model[1].weight = model[0].weight
    return model


@mome.register_model
def _test_own_cfg_registry(pretrained: bool = False):
    model = nn.Linear(2, 2)
    model.pretrained_cfg = mome.PretrainedCfg(notes="set by the entrypoint")
    return model


def _plain(pretrained: bool = False, **kwargs):
    return nn.Linear(2, 2)


def _named_entrypoint(name):
    def entrypoint(pretrained: bool = False, **kwargs):
        return nn.Linear(2, 2)

    entrypoint.__name__ = name
    return entrypoint


for _n in (1, 2, 10, 20):
    mome.register_model(_named_entrypoint(f"_test_regsort_x{_n}"))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# --- names, listing, cards -------------------------------------------------------------------------


def test_listing_wildcards_natural_sort_and_excludes():
    assert mome.list_models("_test_regsort_*") == [f"_test_regsort_x{n}" for n in (1, 2, 10, 20)]
    assert mome.list_models(["_test_regsort_x1*", "_test_tiny_m?p_*"]) == [
        "_test_regsort_x1",
        "_test_regsort_x10",
        "_test_tiny_mlp_registry",
    ]
    assert mome.list_models("_test_regsort_*", exclude_filters=["*x1", "*x2*"]) == ["_test_regsort_x10"]
    assert mome.list_models("_test_*", module="test_registry")[:1] == ["_test_own_cfg_registry"]
    assert mome.list_models("_test_*", module="nope") == []
    assert mome.is_model("_test_tiny_mlp_registry.any_tag") and not mome.is_model("_test_nope")
    assert mome.model_entrypoint("_test_tiny_mlp_registry.scratch") is _test_tiny_mlp_registry


def test_tags_default_and_pretrained_listing():
    tags = mome.list_models("_test_tiny_mlp_registry", include_tags=True)
    assert tags == [f"_test_tiny_mlp_registry.{t}" for t in ("hub", "in1k_file", "jft_vmoe", "scratch", "web")]
    # a filter without a tag matches arch.*; archs without cards stay untagged
    assert mome.list_models("_test_tied_registry", include_tags=True) == ["_test_tied_registry"]
    pretrained = mome.list_pretrained("_test_tiny_*")
    assert "_test_tiny_mlp_registry.scratch" not in pretrained and "_test_tiny_moe_registry" not in pretrained
    assert pretrained == mome.list_models("_test_tiny_*", pretrained=True)
    assert len(pretrained) == 4 and all(name.startswith("_test_tiny_mlp_registry.") for name in pretrained)
    assert mome.list_pretrained("_test_tiny_mlp_registry.s*") == []

    default = mome.get_pretrained_cfg("_test_tiny_mlp_registry")
    assert default.tag == "in1k_file" and default.architecture == "_test_tiny_mlp_registry" and default.has_weights()
    scratch = mome.get_pretrained_cfg("_test_tiny_mlp_registry.scratch")
    assert scratch.input_size == (3, 8, 8) and scratch.mean == (0.5, 0.5, 0.5) and not scratch.has_weights()
    scratch.notes = "mutated copy"
    assert mome.get_pretrained_cfg("_test_tiny_mlp_registry.scratch").notes is None
    bare = mome.get_pretrained_cfg("_test_tied_registry")
    assert bare.architecture == "_test_tied_registry" and bare.tag is None and not bare.has_weights()
    with pytest.raises(mome.UnknownModelError, match="_test_tiny_mlp_registry.scratch"):
        mome.get_pretrained_cfg("_test_tiny_mlp_registry.scrach")
    with pytest.raises(mome.UnknownModelError, match="did you mean _test_tiny_mlp_registry"):
        mome.get_pretrained_cfg("_test_tiny_mlp_registy")


def test_first_tag_is_default_without_star_and_register_pretrained_cfg():
    def _test_tags_registry(pretrained=False):
        return nn.Linear(2, 2)

    mome.register_model(_test_tags_registry, pretrained_cfgs={"b": {}, "a": {"notes": "second"}})
    assert mome.get_pretrained_cfg("_test_tags_registry").tag == "b"
    mome.register_pretrained_cfg("_test_tags_registry.c*", mome.PretrainedCfg(file="c.safetensors"))
    assert mome.get_pretrained_cfg("_test_tags_registry").tag == "c"
    assert mome.list_pretrained("_test_tags_registry") == ["_test_tags_registry.c"]
    with pytest.warns(UserWarning, match="overwriting the pretrained cfg"):
        mome.register_pretrained_cfg("_test_tags_registry.c", {"file": "c2.safetensors"})
    assert mome.get_pretrained_cfg("_test_tags_registry").file == "c2.safetensors"  # still the default
    with pytest.warns(UserWarning, match="overwriting the pretrained cfg"):
        mome.register_pretrained_cfg("_test_tags_registry.a", {"notes": "replaced"})
    assert mome.get_pretrained_cfg("_test_tags_registry.a").notes == "replaced"
    with pytest.raises(mome.UnknownModelError, match="_test_tags_registry"):
        mome.register_pretrained_cfg("_test_tags_registr.d", {})
    with pytest.raises(mome.InvalidArgumentError, match="at most one default tag"):
        mome.register_model(_plain, pretrained_cfgs={"a*": {}, "b*": {}})
    with pytest.raises(ValueError, match="architecture"):
        mome.register_pretrained_cfg("_test_tags_registry.e", {"architecture": "other"})


def test_reregistering_warns_and_overwrites():
    def _test_rereg_registry(pretrained=False):
        return nn.Linear(2, 2)

    mome.register_model(_test_rereg_registry, pretrained_cfgs={"old": {"file": "x"}})

    def _test_rereg_registry(pretrained=False):  # noqa: F811
        return nn.Linear(3, 3)

    with pytest.warns(UserWarning, match="overwriting the registered model _test_rereg_registry"):
        mome.register_model(_test_rereg_registry)
    assert mome.create_model("_test_rereg_registry").in_features == 3
    assert mome.list_models("_test_rereg_registry", include_tags=True) == ["_test_rereg_registry"]


def test_pretrained_cfg_fields_are_fixed():
    with pytest.raises(TypeError, match="colour"):
        mome.PretrainedCfg(colour="red")
    with pytest.raises(TypeError, match="colour"):
        mome.PretrainedCfg.from_dict({"file": "w", "colour": "red"})
    with pytest.raises(TypeError, match="colour"):
        mome.create_model("_test_tiny_mlp_registry", pretrained_cfg_overlay={"colour": "red"})
    cfg = mome.PretrainedCfg(input_size=[3, 224, 224], paper_ids=["arXiv:2106.05974"], results={"top1": 80.1})
    assert cfg.input_size == (3, 224, 224) and cfg.paper_ids == ("arXiv:2106.05974",)
    assert cfg["input_size"] == cfg.get("input_size") and cfg.get("mean", "x") == "x"
    with pytest.raises(KeyError):
        cfg["colour"]


def test_split_and_parse_model_name():
    assert mome.split_model_name_tag("vmoe_b16_e8.jft.ft") == ("vmoe_b16_e8", "jft.ft")
    assert mome.split_model_name_tag("vmoe_b16_e8", no_tag="none") == ("vmoe_b16_e8", "none")
    parse = mome.parse_model_name
    assert parse("vmoe_b16_e8.tag") == (None, "vmoe_b16_e8.tag")
    assert parse("hf-hub:org/repo") == ("hf-hub", "org/repo")
    assert parse("hf_hub:org/repo") == ("hf-hub", "org/repo")
    assert parse("local-dir:C:\\models\\m") == ("local-dir", "C:\\models\\m")
    for name in ("org/repo", "C:\\models\\m", "./folder", "x:y"):
        with pytest.raises(ValueError, match="hf-hub:.*local-dir:"):
            mome.create_model(name)
    with pytest.raises(ValueError, match="unknown model source"):
        parse("s3:bucket/model")
    with pytest.raises(ValueError, match="nothing after"):
        parse("local-dir:")


# --- create_model ----------------------------------------------------------------------------------


def test_create_model_sets_cfg_and_drops_none_kwargs():
    model = mome.create_model("_test_tiny_mlp_registry.scratch", hidden=None, num_classes=None, dim=6)
    assert model[0].in_features == 6 and model[0].out_features == 16 and model[2].out_features == 4
    assert model.seen_pretrained is False
    assert model.pretrained_cfg.tag == "scratch" and model.mome_model_name == "_test_tiny_mlp_registry"
    assert model.mome_model_args == {"dim": 6}
    data = timm.data.resolve_model_data_config(model)
    assert data["input_size"] == (3, 8, 8) and data["mean"] == (0.5, 0.5, 0.5) and data["std"] == (0.25,) * 3
    overlaid = mome.create_model("_test_tiny_mlp_registry.scratch", pretrained_cfg_overlay={"crop_pct": 0.9})
    assert overlaid.pretrained_cfg.crop_pct == 0.9 and overlaid.pretrained_cfg.tag == "scratch"
    own = mome.create_model("_test_own_cfg_registry")
    assert own.pretrained_cfg.notes == "set by the entrypoint"


def test_unknown_model_names_close_matches():
    with pytest.raises(mome.UnknownModelError, match="did you mean _test_tiny_mlp_registry") as info:
        mome.create_model("_test_tiny_mlp_registr")
    assert isinstance(info.value, ValueError)
    with pytest.raises(mome.UnknownModelError, match="list_models"):
        mome.create_model("zzzz_nothing_like_it")


@pytest.mark.parametrize("fmt", ["safetensors", "pt_state_dict", "pt_model_ddp", "pt_plain"])
def test_checkpoint_path_loads_exactly(tmp_path, fmt):
    from safetensors.torch import save_file

    source = mome.create_model("_test_tiny_moe_registry")
    target = mome.create_model("_test_tiny_moe_registry")
    weights = state(source)
    assert not all(torch.equal(weights[k], v) for k, v in state(target).items())
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(weights, path)
    else:
        path = tmp_path / "w.pt"
        obj = {
            "pt_state_dict": {"state_dict": weights, "epoch": 3},
            "pt_model_ddp": {"model": {f"module.{k}": v for k, v in weights.items()}},
            "pt_plain": weights,
        }[fmt]
        torch.save(obj, path)
    loaded = mome.create_model("_test_tiny_moe_registry", checkpoint_path=path)
    assert_same(state(loaded), weights)
    x = torch.randn(2, 5, 8)
    source.eval(), loaded.eval()
    assert torch.equal(source(x), loaded(x))


def test_checkpoint_mismatch_names_keys_and_leaves_model_unchanged(tmp_path):
    from safetensors.torch import save_file

    model = mome.create_model("_test_tiny_moe_registry")
    before = state(model)
    bad = {k: torch.zeros_like(v) for k, v in before.items()}
    del bad["head.bias"]
    bad["head.extra"] = torch.zeros(1)
    bad["head.weight"] = torch.zeros(2, 8)
    path = tmp_path / "bad.safetensors"
    save_file(bad, path)
    with pytest.raises(mome.CheckpointMismatchError) as info:
        mome.load_checkpoint(model, path)
    message = str(info.value)
    assert str(path) in message and "head.bias" in message and "head.extra" in message
    assert "head.weight: checkpoint (2, 8) vs model (3, 8)" in message
    assert_same(state(model), before)
    with pytest.raises(mome.CheckpointMismatchError, match="missing"):
        mome.create_model("_test_tiny_moe_registry", checkpoint_path=path)


class _Payload:
    """Unpickling this creates a marker file (a stand-in for os.system)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"0.weight": _Payload(marker)}}, path)
    with pytest.raises(ValueError, match="weights_only"):
        mome.create_model("_test_tiny_mlp_registry", checkpoint_path=path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


# --- pretrained=True -------------------------------------------------------------------------------


def test_pretrained_from_file_with_sha256(tmp_path):
    from safetensors.torch import save_file

    weights = state(mome.create_model("_test_tiny_mlp_registry"))
    path = tmp_path / "mlp.safetensors"
    save_file(weights, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = mome.create_model("_test_tiny_mlp_registry", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    assert_same(state(model), weights)
    assert model.seen_pretrained is True and model.pretrained_cfg.file == str(path)
    mome.create_model(
        "_test_tiny_mlp_registry", pretrained=True, pretrained_cfg_overlay={"file": str(path), "sha256": digest}
    )
    with pytest.raises(ValueError, match="sha256"):
        mome.create_model(
            "_test_tiny_mlp_registry", pretrained=True, pretrained_cfg_overlay={"file": str(path), "sha256": "0" * 64}
        )
    assert path.exists()  # the user's own file is never deleted
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        mome.create_model("_test_tiny_mlp_registry", pretrained=True)


def test_pretrained_without_weights_or_needing_conversion():
    with pytest.raises(ValueError, match="_test_tiny_mlp_registry.scratch has no pretrained weights"):
        mome.create_model("_test_tiny_mlp_registry.scratch", pretrained=True)
    with pytest.raises(mome.PretrainedUnavailableError, match="'vmoe' format.*zoo loader.*checkpoint_path="):
        mome.create_model("_test_tiny_mlp_registry.jft_vmoe", pretrained=True)
    with pytest.raises(mome.PretrainedUnavailableError, match="URL.*checkpoint_path="):
        mome.create_model("_test_tiny_mlp_registry.web", pretrained=True)


def test_hub_offline_without_cache_is_a_clear_error(tmp_path):
    with pytest.raises(mome.PretrainedUnavailableError, match="hf download mome-test/does-not-exist-anywhere"):
        mome.create_model("_test_tiny_mlp_registry.hub", pretrained=True, cache_dir=tmp_path)
    with pytest.raises(mome.PretrainedUnavailableError, match="hf download mome-test/nope"):
        mome.create_model("hf-hub:mome-test/nope", cache_dir=tmp_path)


def test_hub_download_checks_sha256_and_deletes_a_bad_download(tmp_path, monkeypatch):
    import huggingface_hub
    from safetensors.torch import save_file

    weights = state(mome.create_model("_test_tiny_mlp_registry"))
    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    save_file(weights, blob)
    link = tmp_path / "snapshots" / "model.safetensors"
    link.parent.mkdir()
    link.symlink_to(blob)
    calls = []

    def fake_download(repo_id, filename, cache_dir=None):
        calls.append((repo_id, filename, cache_dir))
        return str(link)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    model = mome.create_model(
        "_test_tiny_mlp_registry.hub", pretrained=True, cache_dir=tmp_path, pretrained_cfg_overlay={"sha256": digest}
    )
    assert_same(state(model), weights)
    assert calls == [("mome-test/does-not-exist-anywhere", "model.safetensors", tmp_path)]
    with pytest.raises(ValueError, match="sha256.*deleted"):
        mome.create_model("_test_tiny_mlp_registry.hub", pretrained=True, pretrained_cfg_overlay={"sha256": "0" * 64})
    assert not link.exists() and not blob.exists()


# --- saved folders ---------------------------------------------------------------------------------


def test_save_pretrained_local_dir_round_trip_is_exact(tmp_path):
    model = mome.create_model("_test_tiny_mlp_registry.scratch", hidden=12, act="relu")
    folder = mome.save_pretrained(model, tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "_test_tiny_mlp_registry"
    assert config["model_args"] == {"hidden": 12, "act": "relu"}
    assert config["pretrained_cfg"]["tag"] == "scratch" and config["pretrained_cfg"]["input_size"] == [3, 8, 8]

    loaded = mome.create_model(f"local-dir:{folder}")
    assert_same(state(loaded), state(model))
    assert isinstance(loaded[1], nn.ReLU) and loaded.pretrained_cfg.input_size == (3, 8, 8)
    assert loaded.mome_model_args == {"hidden": 12, "act": "relu"}
    overridden = mome.create_model(f"local-dir:{folder}", act="gelu", dim=None)
    assert isinstance(overridden[1], nn.GELU)
    assert_same(state(overridden), state(model))
    with pytest.raises(mome.CheckpointMismatchError, match="0.weight"):
        mome.create_model(f"local-dir:{folder}", hidden=10)

    # saving again replaces the folder; a folder holding other files is left alone
    mome.save_pretrained(loaded, folder)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        mome.save_pretrained(loaded, folder)
    assert (folder / "notes.txt").read_text() == "mine"


def test_save_pretrained_handles_tied_weights_and_moe(tmp_path):
    tied = mome.create_model("_test_tied_registry")
    loaded = mome.create_model(f"local-dir:{mome.save_pretrained(tied, tmp_path / 'tied')}")
    assert loaded[1].weight is loaded[0].weight
    assert_same(state(loaded), state(tied))
    moe = mome.create_model("_test_tiny_moe_registry", num_experts=2)
    loaded = mome.create_model(f"local-dir:{mome.save_pretrained(moe, tmp_path / 'moe')}")
    assert_same(state(loaded), state(moe))


def test_hf_hub_reads_the_saved_folder_format(tmp_path, monkeypatch):
    import huggingface_hub

    model = mome.create_model("_test_tiny_mlp_registry", hidden=5)
    folder = mome.save_pretrained(model, tmp_path / "repo")
    calls = []

    def fake_snapshot(repo_id, allow_patterns=None, cache_dir=None):
        calls.append((repo_id, allow_patterns, cache_dir))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    loaded = mome.create_model("hf-hub:org/tiny", cache_dir=tmp_path)
    assert_same(state(loaded), state(model))
    assert calls == [("org/tiny", ["config.json", "*.safetensors"], tmp_path)]


def test_save_pretrained_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    model = mome.create_model("_test_tiny_mlp_registry")
    monkeypatch.setattr(safetensors.torch, "save_model", failing_save)
    with pytest.raises(OSError, match="disk full"):
        mome.save_pretrained(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_pretrained_needs_a_name_and_json_args(tmp_path):
    with pytest.raises(ValueError, match="model_name="):
        mome.save_pretrained(nn.Linear(2, 2), tmp_path / "a")
    model = mome.create_model("_test_tiny_moe_registry")
    with pytest.raises(ValueError, match="'norm'"):
        mome.save_pretrained(model, tmp_path / "b", model_args={"norm": nn.LayerNorm})
    assert not (tmp_path / "b").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = mome.save_pretrained(nn.Linear(2, 2), tmp_path / "c", model_name="_test_own_cfg_registry.x")
    assert json.loads((folder / "config.json").read_text())["architecture"] == "_test_own_cfg_registry"
