"""Helpers of the training CLI tests: compose ``conf/train.yaml`` as ``mome-train`` does, in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import mome
import mome.cli  # noqa: F401  (registers the mome-model:// config source conf/train.yaml and eval.yaml use)

CONF = Path(mome.conf_dir())
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_train(output_dir: Path, overrides: list[str] = (), config_name: str = "train") -> DictConfig:
    """The config ``mome-<config_name> <overrides>`` runs with (``train`` or ``eval``), outputs under ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
    HydraConfig.instance().set_config(cfg)
    return cfg


def state_dict_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
