"""mome's LightningModules (tasks) and callbacks; imports Lightning (``import mome`` does not)."""

from .base import MomeTask, NonFiniteLossError, TaskConfigError, build_model, model_from_checkpoint, set_trainable
from .callbacks import RoutingTelemetry, routing_heatmap
from .classification import ClassificationTask
from .contrastive import ContrastiveTask
from .evaluation import (
    ClassificationEvalTask,
    EvaluationTask,
    LinearProbeTask,
    RetrievalTask,
    VQAEvalTask,
    ZeroShotClassificationTask,
)
from .expert_parallel import ExpertParallelDDPStrategy, ExpertParallelFSDPStrategy
from .llava import LLaVATask
from .routing_report import RoutingRecorder
from .vlmo import VLMoTask

__all__ = [
    "ClassificationEvalTask",
    "ClassificationTask",
    "ContrastiveTask",
    "EvaluationTask",
    "ExpertParallelDDPStrategy",
    "ExpertParallelFSDPStrategy",
    "LLaVATask",
    "LinearProbeTask",
    "MomeTask",
    "NonFiniteLossError",
    "RetrievalTask",
    "RoutingRecorder",
    "RoutingTelemetry",
    "TaskConfigError",
    "VLMoTask",
    "VQAEvalTask",
    "ZeroShotClassificationTask",
    "build_model",
    "model_from_checkpoint",
    "routing_heatmap",
    "set_trainable",
]
