"""The config groups ``mome-train --help`` and ``mome-eval --help`` show: each one is in that app's defaults list
and each of its options changes the composed run; a group option that needs a missing plugin is one line naming
the pip extra."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tomllib
from omegaconf import OmegaConf
from train_helpers import CONF, compose_train

from mome.cli._help import PLUGINS, app_groups, check_plugins, config_groups, missing_plugin


def _job_config(tmp_path, config_name, overrides=()):
    cfg = compose_train(tmp_path, list(overrides), config_name=config_name)
    return OmegaConf.to_container(cfg, resolve=False) | {"hydra": None}


def test_each_app_lists_its_own_groups(tmp_path):
    train, evaluate = app_groups("train"), app_groups("eval")
    assert "eval_task" not in train and {"experiment", "task", "hparams_search", "moe"} <= set(train)
    assert {"experiment", "task", "hparams_search", "callbacks"}.isdisjoint(evaluate)
    assert {"eval_task", "moe", "data", "model"} <= set(evaluate)
    listing = config_groups("train").splitlines()
    assert [line.split(":")[0] for line in listing] == train
    assert not any(line.startswith("eval_task") for line in listing)
    for config_name in ("train", "eval"):  # what --help prints: the template resolves the app's listing
        template = compose_train(tmp_path, [], config_name=config_name).hydra.help.template
        assert config_groups(config_name) in template


@pytest.mark.parametrize("config_name", ["train", "eval"])
def test_every_option_of_a_listed_group_changes_the_run(config_name, tmp_path):
    """``group=option`` for every option the help shows gives another composed config than the default one."""
    default = _job_config(tmp_path, config_name)
    choices = compose_train(tmp_path, [], config_name=config_name).hydra.runtime.choices
    unchanged = []
    for group in app_groups(config_name):
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            if option == choices.get(group) or missing_plugin(group, option):
                continue  # the default selection; a plugin this environment lacks (see the next test)
            if group == "moe":  # a routing recipe needs a model of its families
                overrides = ["model=vmoe_tiny_patch8_e4", f"moe={option}"]
                baseline = _job_config(tmp_path, config_name, ["model=vmoe_tiny_patch8_e4"])
            else:
                overrides, baseline = [f"{group}={option}"], default
            if _job_config(tmp_path, config_name, overrides) == baseline:
                unchanged.append(f"{group}={option}")
    assert not unchanged, f"options shown by mome-{config_name} --help that change nothing: {unchanged}"


def testmissing_plugin_is_one_line_naming_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(PLUGINS, ("hparams_search", "optuna"), ("hydra_plugins.no_such_sweeper", "mome[optuna]"))
    with pytest.raises(SystemExit) as exit_info:
        check_plugins("mome-train", ["-m", "experiment=vmoe_digits", "hparams_search=optuna"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    expected = "hparams_search=optuna needs a Hydra plugin that is not installed: pip install 'mome[optuna]'"
    assert lines == [f"mome-train: error: {expected}"]
    check_plugins("mome-train", ["experiment=vmoe_digits"])  # nothing else is refused
    assert "optuna (needs pip install 'mome[optuna]')" in config_groups("train")


def test_every_plugin_has_its_pip_extra():
    project = tomllib.loads((CONF.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for (group, option), (_, requirement) in PLUGINS.items():
        assert (CONF / group / f"{option}.yaml").is_file()
        extra = requirement.removeprefix("mome[").removesuffix("]")
        assert extras[extra], requirement
    sweepers = [p.stem for p in (CONF / "hparams_search").glob("*.yaml")]
    assert all(("hparams_search", name) in PLUGINS for name in sweepers)  # every sweep needs its sweeper plugin


@pytest.mark.skipif(not missing_plugin("hparams_search", "optuna"), reason="the Optuna sweeper is installed")
def test_mome_train_without_optuna_says_which_extra(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mome.cli.train", "-m", "hparams_search=optuna"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "pip install 'mome[optuna]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "logs").exists()


def test_adding_a_group_the_app_already_has_names_the_plain_choice(capsys):
    """``+moe=switch_z_loss`` and ``+callbacks=ema`` (a config comment once said so): one line naming what works."""
    for prog, arg, expected in (
        ("mome-train", "+moe=switch_z_loss", "select the option with moe=switch_z_loss"),
        ("mome-eval", "+moe=vmoe", "select the option with moe=vmoe"),
        ("mome-train", "+callbacks=ema", "callbacks=[default,...]"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            check_plugins(prog, ["experiment=vmoe_digits", arg] if prog == "mome-train" else [arg])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: {arg}: ") and expected in lines[0]
    check_plugins("mome-train", ["+model.num_classes=10", "+trainer.enable_progress_bar=false", "moe=vmoe"])
