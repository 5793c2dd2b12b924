"""Output folders: a run never replaces an earlier run's config or export; ``ckpt_path=last`` resumes from the newest
last checkpoint of the run's folder (or stops before training when there is none); the commands the config
comments give for callbacks work as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict, read_write
from train_helpers import CONF, compose_train

import mome
from mome.cli import _run_folder
from mome.cli._common import run_cli
from mome.cli._run_folder import RunFolderGuard, free_name
from mome.cli.train import _job, newest_last_checkpoint, train

SHORT = [
    "experiment=vmoe_digits",
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "callbacks.model_checkpoint.monitor=null",
    "logger=csv",
    "+trainer.enable_progress_bar=false",
]


def _earlier_run(folder: Path) -> dict[Path, bytes]:
    """A folder as an earlier mome-train run leaves it: its recorded config and its exported model."""
    files = {
        folder / ".hydra" / "config.yaml": b"seed: 0\n",
        folder / "model" / "config.json": b'{"architecture": "vmoe_tiny_patch8_e4"}',
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _guard(folder: Path, overrides: list[str], config_name: str = "train"):
    cfg = compose_train(folder.parent / "compose", [f"hydra.run.dir={folder}", *overrides], config_name=config_name)
    RunFolderGuard().on_run_start(config=cfg)
    return cfg


def test_a_second_run_into_a_used_folder_is_refused_before_hydra_writes(tmp_path):
    """The bug: a second run into the same hydra.run.dir replaced the first one's .hydra/config.yaml and model/."""
    folder = tmp_path / "run"
    files = _earlier_run(folder)
    result = subprocess.run(
        [sys.executable, "-m", "mome.cli.train", "experiment=vmoe_digits", f"hydra.run.dir={folder}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mome-train: error: hydra.run.dir={folder} already holds")
    assert "ckpt_path=last" in lines[0]
    assert {path: path.read_bytes() for path in files} == files  # untouched
    assert sorted(p.name for p in folder.iterdir()) == [".hydra", "model"]


def test_guard_in_process(tmp_path, capsys, monkeypatch):
    new = tmp_path / "new"
    _guard(new, [])
    assert new.absolute() not in _run_folder.EARLIER  # a setup error may remove this folder: it is the run's own

    used = tmp_path / "used"
    _earlier_run(used)
    for config_name, overrides in (("train", []), ("eval", ["ckpt_path=/x/last.ckpt"])):
        with pytest.raises(SystemExit) as exit_info:
            _guard(used, overrides, config_name)
        assert exit_info.value.code == 2
        assert f"mome-{config_name}: error: hydra.run.dir={used} already holds" in capsys.readouterr().err

    monkeypatch.setenv("LOCAL_RANK", "1")  # rank 1 re-run by Lightning's launcher: rank 0's folder, not checked
    _guard(used, [])
    monkeypatch.delenv("LOCAL_RANK")

    cfg = _guard(used, ["ckpt_path=last"])  # a resume continues its folder: its config is recorded beside
    assert used.absolute() in _run_folder.EARLIER and cfg.hydra.output_subdir == ".hydra-v1"
    (used / ".hydra-v1").mkdir()
    assert _guard(used, ["ckpt_path=last"]).hydra.output_subdir == ".hydra-v2"

    # a setup error of the resumed run (here: no checkpoint to resume) leaves the earlier run's folder alone
    with pytest.raises(SystemExit):
        run_cli("mome-train", _job, compose_train(used, [*SHORT, "ckpt_path=last"]))
    assert (used / "model" / "config.json").is_file()


def test_timestamped_run_dir_is_resolved_once(tmp_path):
    """``${now:...}`` in hydra.run.dir is fixed when checked: Hydra later creates the folder the guard checked."""
    cfg = compose_train(tmp_path / "compose", [f"paths.root_dir={tmp_path}"])
    assert "${now:" in OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]
    RunFolderGuard().on_run_start(config=cfg)
    fixed = OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]
    assert "${" not in fixed and fixed.startswith(str(tmp_path)) and "/logs/train/runs/" in fixed


def test_default_folder_taken_by_a_run_of_the_same_second_goes_beside(tmp_path):
    used = tmp_path / "logs" / "train" / "runs" / "2026-01-01_00-00-00"
    _earlier_run(used)
    cfg = compose_train(tmp_path / "compose", [])  # hydra.run.dir not given: the timestamped default
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.run.dir = str(used)  # as resolved by a run started in the same second as the earlier one
    RunFolderGuard().on_run_start(config=cfg)
    assert cfg.hydra.run.dir == f"{used}-v1" and sorted(p.name for p in used.iterdir()) == [".hydra", "model"]


def test_free_name(tmp_path):
    assert free_name(tmp_path / "model") == tmp_path / "model"
    (tmp_path / "model").mkdir()
    (tmp_path / "model-v1").mkdir()
    assert free_name(tmp_path / "model") == tmp_path / "model-v2"


def test_newest_last_checkpoint(tmp_path):
    assert newest_last_checkpoint(tmp_path) is None
    for name, mtime in (("last.ckpt", 100), ("last-v1.ckpt", 200), ("last-v2.ckpt", 150), ("lastly.ckpt", 300)):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(mtime * 10**9, mtime * 10**9))
    assert newest_last_checkpoint(tmp_path).name == "last-v1.ckpt"  # written last, not the highest version
    os.utime(tmp_path / "last.ckpt", ns=(200 * 10**9, 200 * 10**9))
    assert newest_last_checkpoint(tmp_path).name == "last-v1.ckpt"  # a tie (coarse clock, copied files): the later name


def test_ckpt_path_last_resumes_from_the_newest_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    train(compose_train(run, [*SHORT, "trainer.max_steps=2", "test=false", "export=false"]))
    train(compose_train(run, [*SHORT, "trainer.max_steps=3", "test=false", "export=false"]))  # Lightning: last-v1
    checkpoints = run / "checkpoints"
    steps = {p.name: torch.load(p, weights_only=True)["global_step"] for p in checkpoints.glob("last*.ckpt")}
    assert steps == {"last.ckpt": 2, "last-v1.ckpt": 3}
    same = (checkpoints / "last-v1.ckpt").stat().st_mtime_ns
    os.utime(checkpoints / "last.ckpt", ns=(same, same))  # equal times: Lightning's own choice was arbitrary
    _, objects = train(compose_train(run, [*SHORT, "trainer.max_epochs=5", "trainer.max_steps=4", "ckpt_path=last"]))
    assert f"resumes from {checkpoints / 'last-v1.ckpt'}" in capsys.readouterr().out
    assert objects["trainer"].global_step == 4
    assert objects["export_dir"] == run / "model"  # no earlier export here


def test_ckpt_path_last_without_a_last_checkpoint_fails_before_training(tmp_path, capsys):
    """It used to warn and train from scratch (a new run folder has no last checkpoint)."""
    out = tmp_path / "fresh"
    cfg = compose_train(out, [*SHORT, "ckpt_path=last"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli("mome-train", _job, cfg)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mome-train: error:")]
    assert len(lines) == 1 and lines[0].startswith("mome-train: error: ConfigError: ckpt_path=last: no last checkpoint")


def test_a_resumed_finished_run_exports_beside_the_earlier_export(tmp_path):
    run = tmp_path / "run"
    _, first = train(compose_train(run, [*SHORT, "trainer.max_steps=2"]))
    before = (run / "model" / "model.safetensors").read_bytes()
    _, second = train(compose_train(run, [*SHORT, "trainer.max_epochs=5", "trainer.max_steps=3", "ckpt_path=last"]))
    assert first["export_dir"] == run / "model" and second["export_dir"] == run / "model-v1"
    assert (run / "model" / "model.safetensors").read_bytes() == before
    mome.create_model(f"local-dir:{run / 'model-v1'}")


def test_ema_callback_command_of_its_config_comment(tmp_path):
    """conf/callbacks/ema.yaml says how to add it; that command runs, and the run tests and exports the averaged
    weights (the EMA callback used to load the raw weights over the tested checkpoint's average)."""
    comment = (CONF / "callbacks" / "ema.yaml").read_text()
    command = re.search(r"with (callbacks=\S+)", comment).group(1)
    assert command == "callbacks=[default,ema]"
    overrides = [*SHORT, command, "callbacks.ema.decay=0.5", "trainer.max_steps=3"]
    _, objects = train(compose_train(tmp_path, overrides))
    assert "ModelCheckpoint" in {type(c).__name__ for c in objects["trainer"].callbacks}  # the defaults stay
    checkpoint = torch.load(objects["best_checkpoint"], map_location="cpu", weights_only=True)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    exported = mome.create_model(f"local-dir:{objects['export_dir']}").state_dict()
    assert any(not torch.equal(averaged[f"model.{k}"], raw[f"model.{k}"]) for k in exported)  # decay 0.5: they differ
    for name, value in exported.items():
        torch.testing.assert_close(value, averaged[f"model.{name}"], rtol=0, atol=0, msg=name)
