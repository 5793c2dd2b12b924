"""Uploading to the Hugging Face Hub, against the local endpoint of ``tests/hub_server.py`` (the ``local_hub``
fixture): ``mome.push_to_hub`` then ``create_model("hf-hub:...")`` in a fresh process, and ``mome-train
export.push_to_hub=<repo>``. Clients run in subprocesses: this process keeps ``HF_HUB_OFFLINE=1``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_train_cli import _fails_early
from train_helpers import CONF, compose_train

from mome.cli.train import _export_options, train

# Build a tiny V-MoE, push it, and keep an input, its output and the weights to compare with after loading.
PUSH = r"""
import sys, torch, mome
model = mome.create_model("vmoe_tiny_patch8_e4", num_classes=3).eval()
url = mome.push_to_hub(model, "org/tiny", private=True)
x = torch.randn(2, *model.pretrained_cfg.input_size)
with torch.no_grad():
    y = model(x)
torch.save({"x": x, "y": y, "state": model.state_dict()}, sys.argv[1])
print(url)
"""

# Load a Hub repo (and optionally a local folder, or the saved reference) and compare weights and outputs exactly.
LOAD = r"""
import sys, torch, mome
hub = mome.create_model(f"hf-hub:{sys.argv[1]}").eval()
if sys.argv[2].endswith(".pt"):
    ref = torch.load(sys.argv[2])
    x, state = ref["x"], ref["state"]
    with torch.no_grad():
        y = ref["y"]
else:
    local = mome.create_model(f"local-dir:{sys.argv[2]}").eval()
    x, state = torch.randn(2, *local.pretrained_cfg.input_size), local.state_dict()
    with torch.no_grad():
        y = local(x)
with torch.no_grad():
    assert torch.equal(hub(x), y), "outputs differ"
loaded = hub.state_dict()
assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in loaded), "weights differ"
print(hub.mome_model_name, hub.mome_model_args)
"""


def test_push_to_hub_then_create_model_from_the_hub_in_a_fresh_process(local_hub, tmp_path):
    pushed = local_hub.run_python(PUSH, tmp_path / "pusher", str(tmp_path / "ref.pt"))
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.strip().startswith(f"{local_hub.url}/org/tiny/commit/")

    files = local_hub.repo_files("org/tiny")
    assert set(files) == {"config.json", "model.safetensors", "README.md"}
    config = json.loads(files["config.json"])
    assert config["architecture"] == "vmoe_tiny_patch8_e4" and config["model_args"] == {"num_classes": 3}
    assert 'mome.create_model("hf-hub:org/tiny")' in files["README.md"].decode()
    assert local_hub.is_private("org/tiny")

    loaded = local_hub.run_python(LOAD, tmp_path / "loader", "org/tiny", str(tmp_path / "ref.pt"))
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split()[0] == "vmoe_tiny_patch8_e4"


def test_export_options_keep_the_bool_spelling_and_read_the_push(tmp_path):
    assert _export_options(compose_train(tmp_path, ["experiment=vmoe_digits"])) == (True, None, None)
    assert _export_options(compose_train(tmp_path, ["export=false"])) == (False, None, None)
    assert _export_options(compose_train(tmp_path, ["export.enabled=false"])) == (False, None, None)
    cfg = compose_train(tmp_path, ["export.push_to_hub=org/run", "export.private=true"])
    assert _export_options(cfg) == (True, "org/run", True)


def test_a_bad_push_fails_before_training(tmp_path, capsys):
    _fails_early(tmp_path / "a", capsys, ["export.push_to_hub=org/run/extra"], "export.push_to_hub='org/run/extra'")
    _fails_early(tmp_path / "b", capsys, ["export.push_to_hub=123"], "export.push_to_hub=123 is not a Hub repo id")
    _fails_early(tmp_path / "c", capsys, ["export.enabled=false", "export.push_to_hub=org/run"], "export.enabled=true")
    _fails_early(tmp_path / "d", capsys, ["export.push_to_hub=org/run", "export.private=maybe"], "export.private")


def test_a_fast_dev_run_pushes_nothing_and_says_so(tmp_path):
    overrides = ["experiment=vmoe_digits", "trainer.fast_dev_run=1", "logger=csv", "export.push_to_hub=org/run"]
    with pytest.warns(UserWarning, match="nothing pushed, trainer.fast_dev_run exports no model"):
        _, objects = train(compose_train(tmp_path, overrides))  # no Hub is reached: this process is offline
    assert "export_dir" not in objects and "pushed_to" not in objects


@pytest.mark.slow  # about 35 s on 2 CPU cores: a mome-train process, then a loading one
def test_mome_train_pushes_the_exported_model_with_its_card(local_hub, tmp_path):
    run = tmp_path / "run"
    overrides = ["experiment=vmoe_digits", "logger=csv", "trainer.max_epochs=1", "trainer.limit_train_batches=1"]
    overrides += ["trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "+trainer.enable_progress_bar=false"]
    overrides += ["export.push_to_hub=org/run", f"hydra.run.dir={run}"]
    trained = subprocess.run(
        [sys.executable, "-m", "mome.cli.train", *overrides],
        cwd=CONF.parent,
        env=local_hub.client_env(tmp_path / "trainer"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"pushed to {local_hub.url}/org/run/commit/" in trained.stdout

    exported = run / "model"
    files = local_hub.repo_files("org/run")
    assert files == {p.name: p.read_bytes() for p in exported.iterdir()}  # the exported folder, byte for byte
    assert 'mome.create_model("hf-hub:org/run")' in files["README.md"].decode()

    loaded = local_hub.run_python(LOAD, tmp_path / "loader", "org/run", str(exported))
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split()[0] == "vmoe_tiny_patch8_e4"
