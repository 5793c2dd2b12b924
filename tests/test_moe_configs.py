"""conf/moe: a routing recipe selected with ``moe=<name>`` is merged into the model spec and changes the model
that ``mome-train`` / ``mome-eval`` build; a recipe that does not fit the model's family stops the run early."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from train_helpers import CONF, compose_train

import mome
from mome.cli._common import model_family, run_cli
from mome.cli.eval import _job as eval_job
from mome.cli.train import _job as train_job
from mome.cli.train import train
from mome.layers import MoE
from mome.lit.base import build_model
from mome.models.limoe import LIMOE_MOE_DEFAULTS
from mome.models.vmoe import VMOE_MOE_DEFAULTS

RECIPES = sorted(p.stem for p in (CONF / "moe").glob("*.yaml"))
#: The tiny variant of each family (the recipes are built on them).
TINY = {model_family(name): name for name in mome.list_models("*tiny*")}
#: The recipe that is a family's own routing (selecting it on that family changes nothing).
OWN_RECIPE = {"vmoe": "vmoe", "limoe": "limoe", "soft_moe_vit": "soft_moe"}


def _recipe(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "moe" / f"{name}.yaml"))


def _moe_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, MoE)}


def _settings(layer: MoE) -> dict:
    """What a recipe sets on an MoE layer: the router (its class and options) and the layer's options."""
    fields = ("capacity_factor", "capacity_multiple", "dispatch", "global_entropy_threshold", "num_modalities")
    return {"router": repr(layer.router), "aux_loss_weights": dict(layer.aux_loss_weights)} | {
        field: getattr(layer, field) for field in fields
    }


def test_every_recipe_is_a_global_package_that_names_its_families():
    assert {"switch_z_loss", "expert_choice", "hash", "mixtral", "soft_moe", "vmoe", "limoe"} <= set(RECIPES)
    for name in RECIPES:
        text = (CONF / "moe" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n"), name
        recipe = _recipe(name)
        assert set(recipe) == {"moe", "model"}, name
        assert recipe["moe"]["applies_to"] and set(recipe["moe"]["applies_to"]) <= set(TINY), name


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_changes_the_model_built(name, tmp_path):
    """For every family a recipe applies to: ``model=<tiny> moe=<name>`` composes the recipe into ``cfg.model``;
    the model built from it (by the task's ``build_model``, and by ``hydra.utils.instantiate``: the spec is a
    Hydra config) is ``create_model(<tiny>, **recipe)``, and not the family's default model."""
    recipe = _recipe(name)["model"]
    for family in _recipe(name)["moe"]["applies_to"]:
        cfg = compose_train(tmp_path, [f"model={TINY[family]}", f"moe={name}"], config_name="eval")
        spec = OmegaConf.to_container(cfg.model)
        assert recipe.items() <= {**spec, "moe_kwargs": recipe.get("moe_kwargs")}.items(), family
        assert recipe.get("moe_kwargs", {}).items() <= spec.get("moe_kwargs", {}).items(), family
        built = repr(build_model(spec))
        assert built == repr(instantiate(cfg.model)) == repr(mome.create_model(TINY[family], **recipe)), family
        if OWN_RECIPE[family] != name:  # a family's own recipe restates its defaults (see the next test)
            assert built != repr(mome.create_model(TINY[family])), family
        layers = _moe_layers(build_model(spec))
        if recipe["moe_type"] in ("soft", "smear"):
            assert not layers and {"soft": "SoftMoE", "smear": "SMEAR"}[recipe["moe_type"]] in built, family
        else:
            assert layers, family
            expected = recipe.get("moe_kwargs", {}).get("aux_loss_weights")
            assert expected is None or all(layer.aux_loss_weights == expected for layer in layers.values()), family


@pytest.mark.parametrize(("name", "defaults"), [("vmoe", VMOE_MOE_DEFAULTS), ("limoe", LIMOE_MOE_DEFAULTS)])
def test_a_family_recipe_is_its_code_defaults(name, defaults):
    """conf/moe/vmoe.yaml and limoe.yaml restate their family's defaults for the other families; the code is
    the one source: the recipe holds the same values, and on its own family it changes nothing."""
    recipe = _recipe(name)["model"]
    for key, value in defaults.items():
        assert recipe["moe_kwargs"][key] == value, key
    torch.manual_seed(0)
    default_model = mome.create_model(TINY[name])
    torch.manual_seed(0)
    with_recipe = mome.create_model(TINY[name], **recipe)
    assert repr(default_model) == repr(with_recipe)
    default_layers, recipe_layers = _moe_layers(default_model), _moe_layers(with_recipe)
    assert default_layers.keys() == recipe_layers.keys() and default_layers
    for key, layer in default_layers.items():
        assert _settings(layer) == _settings(recipe_layers[key]), key


def test_train_with_a_recipe_trains_its_router_and_losses(tmp_path):
    """``mome-train experiment=vmoe_digits moe=switch_z_loss``: top-1 routing, the Switch losses logged term by
    term instead of V-MoE's, and the recipe recorded in the task's model spec (so the checkpoint rebuilds it)."""
    overrides = ["experiment=vmoe_digits", "moe=switch_z_loss", "trainer.fast_dev_run=1", "logger=csv"]
    metrics, objects = train(compose_train(tmp_path, overrides))
    task = objects["task"]
    layers = _moe_layers(task.model)
    assert layers and all(layer.router.top_k == 1 and layer.router.noise_std == 0.0 for layer in layers.values())
    assert all(layer.aux_loss_weights == {"load_balance": 0.01, "z_loss": 0.001} for layer in layers.values())
    assert {"train/aux/load_balance", "train/aux/z_loss"} <= set(metrics), sorted(metrics)
    assert not any(key.endswith(("/aux/importance", "/aux/load")) for key in metrics), sorted(metrics)
    assert task.hparams.model["router"] == "top_k" and task.hparams.model["moe_kwargs"]["dispatch"] == "buffers"


def _fails_early(tmp_path: Path, capsys, job, prog: str, overrides: list[str], config_name: str) -> str:
    out = tmp_path / "run"
    cfg = compose_train(out, overrides, config_name=config_name)
    (out / ".hydra").mkdir(parents=True)  # what Hydra writes before the job starts
    with pytest.raises(SystemExit) as exit_info:
        run_cli(prog, job, cfg)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, lines
    assert not out.exists()  # nothing half-written is left behind
    return lines[0]


def test_a_recipe_of_another_family_fails_before_training(tmp_path, capsys):
    line = _fails_early(
        tmp_path, capsys, train_job, "mome-train", ["experiment=vlmo_digits", "moe=switch_z_loss"], "train"
    )
    assert "ConfigError: moe.applies_to: moe=switch_z_loss applies to vmoe, soft_moe_vit, limoe models" in line
    assert "vlmo_tiny_patch8_32 (a vlmo model)" in line
    line = _fails_early(
        tmp_path, capsys, train_job, "mome-train", ["experiment=vmoe_digits", "moe=modality_pools"], "train"
    )
    assert "moe.applies_to: moe=modality_pools applies to limoe models" in line


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["moe=hash"], "no model is selected"),  # ckpt_path= alone builds the checkpoint's recorded spec
        (["model=local-dir:exported/run42", "moe=hash"], "model.model_name=local-dir:exported/run42 is a saved model"),
    ],
)
def test_a_recipe_needs_a_registry_model(tmp_path, capsys, overrides, expected):
    line = _fails_early(tmp_path, capsys, eval_job, "mome-eval", overrides, "eval")
    assert "ConfigError: moe.applies_to: moe=hash" in line and expected in line
