"""mome's LightningModules (tasks) and callbacks; imports Lightning (``import mome`` does not)."""

from .base import MomeTask, NonFiniteLossError, TaskConfigError, build_model, set_trainable
from .callbacks import RoutingTelemetry, routing_heatmap
from .classification import ClassificationTask
from .contrastive import ContrastiveTask
from .vlmo import VLMoTask

__all__ = [
    "ClassificationTask",
    "ContrastiveTask",
    "MomeTask",
    "NonFiniteLossError",
    "RoutingTelemetry",
    "TaskConfigError",
    "VLMoTask",
    "build_model",
    "routing_heatmap",
    "set_trainable",
]
