"""Every model config in conf/model/ instantiates into the registered model it names."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import mome

CONF = Path(mome.conf_dir())
MODEL_CONFIGS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def test_every_registered_model_has_a_config():
    assert set(MODEL_CONFIGS) == set(mome.list_models(exclude_filters="_*"))  # tests register models named _*


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_config_composes_and_instantiates(name):
    # Compose through Hydra's config search path, as `mome-train model=<name>` will.
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=f"model/{name}")["model"]
    assert cfg.model_name == name
    with torch.device("meta"):
        model = instantiate(cfg)
    assert model.mome_model_name == name
    assert model.pretrained_cfg.input_size is not None
    assert sum(p.numel() for p in model.parameters()) > 0
