"""mome's LightningModules (training and evaluation tasks) and callbacks; imports Lightning (``import mome`` does not).

Every task class is exported here: ``conf/task`` and ``conf/eval_task`` name them ``mome.lit.<ClassName>``.
"""

from .base import MomeTask, NonFiniteLossError, TaskConfigError, build_model, model_from_checkpoint, set_trainable
from .callbacks import MoEModelSummary, RoutingTelemetry, routing_heatmap
from .classification import ClassificationTask
from .contrastive import ContrastiveTask
from .eval_tasks import (
    ClassificationEvalTask,
    EvaluationTask,
    LinearProbeTask,
    RetrievalTask,
    ZeroShotClassificationTask,
)
from .eval_vqa import VQAEvalTask
from .expert_parallel import ExpertParallelDDPStrategy, ExpertParallelFSDPStrategy
from .llava import LLaVATask, UniMoETask
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
    "UniMoETask",
    "LinearProbeTask",
    "MoEModelSummary",
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
