"""``python -m mome.zoo``: list, show, download, convert, verify; one error line and exit status 2 on failure."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

import mome
from mome import _hub, zoo


@mome.register_model
def _test_cli_mlp(pretrained: bool = False, hidden: int = 8):
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2))


@pytest.fixture(scope="module")
def user_zoo(tmp_path_factory):
    """A user zoo folder: a mome-format card with a local file, and a URL card (never fetched here)."""
    folder = tmp_path_factory.mktemp("zoo")
    weights = {k: v.clone() for k, v in _test_cli_mlp(hidden=6).state_dict().items()}
    save_file(weights, folder / "w.safetensors")
    common = {
        "architecture": "_test_cli_mlp",
        "source_format": "mome",
        "input_size": [3, 4, 4],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "license": "apache-2.0",
        "model_kwargs": {"hidden": 6},
    }
    digest = hashlib.sha256((folder / "w.safetensors").read_bytes()).hexdigest()
    local = {**common, "tag": "local", "default": True, "file": "w.safetensors", "sha256": digest}
    web = {**common, "tag": "web", "url": "https://example.invalid/ckpt/w.safetensors", "sha256": digest}
    for card in (local, web):
        (folder / f"_test_cli_mlp.{card['tag']}.yaml").write_text(yaml.safe_dump(card))
    mome.add_zoo_dir(folder)
    return folder, weights, digest


def _run(capsys, *argv):
    status = zoo.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_list_and_show(capsys, user_zoo):
    status, out, _ = _run(capsys, "list", "_test_cli_*")
    assert status == 0
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == ["_test_cli_mlp.local", "_test_cli_mlp.web"]
    assert rows[1][1:] == ["mome", "https://example.invalid/ckpt/w.safetensors"]
    status, out, _ = _run(capsys, "list")
    assert status == 0 and "vlmo_base_patch16_224.vl4m\tunilm_vlmo\thttps://github.com/" in out

    status, out, _ = _run(capsys, "show", "vmoe_b16_e8.in21k_randaug_strong_ft_in1k_384")
    card = yaml.safe_load(out)
    assert status == 0 and list(card)[:2] == ["architecture", "tag"]
    assert card["results"]["ImageNet ReaL"] == {"top1": 84.1} and card["input_size"] == [3, 384, 384]


def test_unknown_names_fail_with_one_line(capsys):
    status, _, err = _run(capsys, "show", "vlmo_base_patch16_224.vl4n")
    assert status == 2
    line = _one_error_line(err)
    assert line.startswith("mome.zoo show: error: UnknownModelError:") and "vlmo_base_patch16_224.vl4m" in line
    with pytest.raises(SystemExit) as info:
        zoo.main(["frobnicate"])
    assert info.value.code == 2


def test_download_offline_is_one_clear_line(capsys, tmp_path, user_zoo):
    status, _, err = _run(capsys, "download", "_test_cli_mlp.web", "--cache-dir", str(tmp_path))
    assert status == 2
    line = _one_error_line(err)
    assert "PretrainedUnavailableError" in line and "HF_HUB_OFFLINE" in line and "example.invalid" in line


def test_download_and_verify_a_cached_file(capsys, tmp_path, user_zoo):
    folder, _, digest = user_zoo
    cached = _hub.url_cache_path("https://example.invalid/ckpt/w.safetensors", tmp_path)
    cached.parent.mkdir(parents=True)
    cached.write_bytes((folder / "w.safetensors").read_bytes())  # as a download on another machine left it
    status, out, _ = _run(capsys, "download", "_test_cli_mlp.web", "--cache-dir", str(tmp_path), "--no-progress")
    assert status == 0 and out.strip() == str(cached)
    status, out, _ = _run(capsys, "verify", "_test_cli_mlp.web", "--cache-dir", str(tmp_path))
    assert status == 0 and out.strip() == f"{cached}: sha256 {digest} OK"

    cached.write_bytes(b"corrupted")
    status, _, err = _run(capsys, "verify", "_test_cli_mlp.web", "--cache-dir", str(tmp_path))
    line = _one_error_line(err)
    assert status == 2 and "ChecksumMismatchError" in line and digest in line and str(cached) in line
    assert cached.exists()  # verify reports; it does not delete

    cached.unlink()
    status, _, err = _run(capsys, "verify", "_test_cli_mlp.web", "--cache-dir", str(tmp_path))
    assert status == 2 and "python -m mome.zoo download _test_cli_mlp.web" in _one_error_line(err)


def test_convert_writes_a_mome_folder(capsys, tmp_path, user_zoo):
    _, weights, _ = user_zoo
    status, out, _ = _run(capsys, "convert", "_test_cli_mlp.local", "--out", str(tmp_path / "out"))
    assert status == 0 and out.strip() == str(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "_test_cli_mlp" and config["model_args"] == {"hidden": 6}
    assert config["pretrained_cfg"]["tag"] == "local" and (tmp_path / "out" / "README.md").is_file()
    model = mome.create_model(f"local-dir:{tmp_path / 'out'}")
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    # a second convert into a folder holding other files refuses, in one line
    (tmp_path / "out" / "mine.txt").write_text("x")
    status, _, err = _run(capsys, "convert", "_test_cli_mlp.local", "--out", str(tmp_path / "out"))
    assert status == 2 and "FileExistsError" in _one_error_line(err)


def test_module_entry_point():
    # one subprocess (importing mome takes seconds): `python -m mome.zoo` runs, and its errors are caught
    # as the registry raises them (the __main__ module defers to mome.zoo, so the classes are the same)
    bad = subprocess.run([sys.executable, "-m", "mome.zoo", "show", "nope_nothing"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == "", bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "mome.zoo show: error: UnknownModelError: unknown model 'nope_nothing'; see mome.list_models()"
    ]
