"""conf/model: every file is a model spec (``model_name`` + ``mome.create_model`` kwargs, ``_target_:
mome.create_model``) that builds the registered model it names, by the task's ``build_model`` and by
``hydra.utils.instantiate`` alike; ``model=<name>`` without a file composes the same kind of spec from the
``mome-model://`` config source."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf
from train_helpers import compose_train

import mome
from mome.lit.base import TaskConfigError, build_model

CONF = Path(mome.conf_dir())
MODEL_CONFIGS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
TEXT_ONLY = {"upcycled_causal_lm"}  # a causal LM takes no images: its pretrained_cfg has no input_size


def test_every_registered_model_has_a_config():
    """Every model mome-train can train has its conf/model config; transformers' MoE VLMs
    (:mod:`mome.models.hf_moe_vlm`) have no training task yet (docs/hf_moe_vlms.md); of Uni-MoE only the tiny
    variant trains (``experiment=uni_moe_digits_stage*``), the paper-sized one is an architecture (docs/uni_moe.md)."""
    from mome.models import hf_moe_vlm

    untrainable = set(hf_moe_vlm.RELEASED) | {f"{model_type}_tiny" for model_type in hf_moe_vlm.FAMILIES}
    untrainable |= set(mome.list_models("uni_moe_*")) - {"uni_moe_tiny_e4"}
    assert set(MODEL_CONFIGS) == set(mome.list_models(exclude_filters="_*")) - untrainable  # tests register _*


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_config_composes_and_instantiates(name):
    # Compose through Hydra's config search path, as `mome-train model=<name>` does.
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=f"model/{name}")["model"]
    assert cfg.model_name == name and cfg._target_ == "mome.create_model"
    with torch.device("meta"):
        torch.manual_seed(0)
        model = instantiate(cfg)
        torch.manual_seed(0)
        built = build_model(OmegaConf.to_container(cfg))  # what the task builds from the same spec
    assert repr(built) == repr(model) and built.mome_model_args == model.mome_model_args
    assert model.mome_model_name == name
    assert model.pretrained_cfg.input_size is not None or name in TEXT_ONLY
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_spec_with_another_target_is_an_error():
    """The task builds with create_model only: a spec naming another ``_target_`` is refused, not ignored."""
    with pytest.raises(TaskConfigError, match=r"model\._target_=timm\.create_model"):
        build_model({"_target_": "timm.create_model", "model_name": "vmoe_tiny_patch8_e4"})
    assert build_model({"model_name": "vmoe_tiny_patch8_e4"}).mome_model_name == "vmoe_tiny_patch8_e4"


NAMES = [
    "vmoe_s32_e8.no_such_tag",  # arch.tag: tags are checked when the model is built
    "local-dir:logs/train/default/model",  # ':' and '/' pass Hydra's override grammar unquoted
    "local-dir:/abs/path/run.42/model",
    "hf-hub:org/repo",
]


@pytest.mark.parametrize("config_name", ["eval", "train"])
@pytest.mark.parametrize("name", NAMES)
def test_model_takes_any_create_model_name(tmp_path, config_name, name):
    """``model=<name>`` for a name without a conf/model file is a group option of the ``mome-model://``
    source: the spec ``{_target_: mome.create_model, model_name: <name>}``, which ``+model.<key>=`` extends."""
    cfg = compose_train(tmp_path, [f"model={name}", "+model.num_classes=10"], config_name=config_name)
    spec = OmegaConf.to_container(cfg.model)
    assert spec == {"_target_": "mome.create_model", "model_name": name, "num_classes": 10}
    assert HydraConfig.get().runtime.choices["model"] == name


def test_a_conf_model_file_comes_before_the_source(tmp_path):
    cfg = compose_train(tmp_path, ["model=vmoe_tiny_patch8_e4"], config_name="eval")
    assert cfg.model.moe_layers == "every_2" and cfg.model.model_name == "vmoe_tiny_patch8_e4"
