"""Untrusted files: pickles that would run code, truncated checkpoints, YAML cards with Python tags."""

import pathlib

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import mome
from mome import zoo


@mome.register_model(pretrained_cfgs={"evil": {"file": "/nonexistent/evil.bin"}})
def _test_security_mlp(pretrained: bool = False):
    return nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))


class _Payload:
    """Unpickling this creates a marker file: a stand-in for ``os.system``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    weights = _state(_test_security_mlp())
    torch.save({"state_dict": {**weights, "0.weight": _Payload(marker)}}, path)

    model = mome.create_model("_test_security_mlp")
    before = _state(model)
    with pytest.raises(mome.UnsafeCheckpointError):
        mome.load_checkpoint(model, path)
    with pytest.raises(mome.UnsafeCheckpointError, match=f"evil{suffix}.*weights_only"):
        mome.create_model("_test_security_mlp", checkpoint_path=path)
    # a card pointing at the file: refused the same way, through pretrained=True
    with pytest.raises(mome.UnsafeCheckpointError, match="weights_only"):
        mome.create_model("_test_security_mlp.evil", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    assert not marker.exists()
    _assert_unchanged(model, before)


def test_truncated_safetensors_is_a_typed_error_and_the_model_is_unchanged(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(_state(_test_security_mlp()), path)
    blob = path.read_bytes()
    model = mome.create_model("_test_security_mlp")
    before = _state(model)
    for cut in (len(blob) - 7, 100, 5):
        path.write_bytes(blob[:cut])
        with pytest.raises(mome.CorruptCheckpointError, match="weights.safetensors") as info:
            mome.load_checkpoint(model, path)
        assert isinstance(info.value, ValueError)
        _assert_unchanged(model, before)
    with pytest.raises(mome.CorruptCheckpointError, match="weights.safetensors"):
        mome.create_model("_test_security_mlp", pretrained=True, pretrained_cfg_overlay={"file": str(path)})


def test_truncated_torch_checkpoint_is_a_typed_error(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(_state(_test_security_mlp()), path)
    path.write_bytes(path.read_bytes()[:200])
    model = mome.create_model("_test_security_mlp")
    before = _state(model)
    with pytest.raises(mome.CorruptCheckpointError, match="weights.pt"):
        mome.load_checkpoint(model, path)
    _assert_unchanged(model, before)


def test_a_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        mome.create_model("_test_security_mlp", checkpoint_path=tmp_path / "absent.safetensors")


def test_cards_are_read_with_safe_yaml(tmp_path):
    marker = tmp_path / "pwned"
    card = tmp_path / "_test_security_mlp.yaml_tag.yaml"
    card.write_text(
        "architecture: _test_security_mlp\n"
        "tag: yaml_tag\n"
        f"notes: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n"
    )
    with pytest.raises(zoo.CardError, match="not valid YAML"):
        zoo.read_card(card)
    assert not marker.exists()


def test_a_users_file_is_never_deleted_on_a_checksum_mismatch(tmp_path):
    path = tmp_path / "mine.safetensors"
    save_file(_state(_test_security_mlp()), path)
    with pytest.raises(mome.ChecksumMismatchError, match="mine.safetensors") as info:
        mome.create_model(
            "_test_security_mlp", pretrained=True, pretrained_cfg_overlay={"file": str(path), "sha256": "0" * 64}
        )
    assert not info.value.deleted and path.exists()
