"""The metrics of ``mome-eval`` as plain functions (no Lightning), and the results record.

Values are fractions in ``[0, 1]`` named as CLIP_benchmark names them:

- :func:`retrieval_recall_at_k`: recall@k as the CLIP paper counts it (a query scores 1 when *any* of its
  positives is among its top k; ties count against the query);
- :func:`fit_linear_probe`: L2-regularised logistic regression (scikit-learn L-BFGS) on frozen features,
  CLIP's linear-probe protocol (Radford et al. 2021, sec. 3.2);
- :func:`clip_benchmark_names`: torchmetrics' ``top1``/``top5`` as CLIP_benchmark's ``acc1``/``acc5``;
- :func:`result_record` and :data:`RESULT_SCHEMA`: one run's results in the CLIP_benchmark JSON schema,
  plus the protocol (templates, sizes, versions).

The evaluation tasks (:mod:`mome.lit.eval_tasks`, :mod:`mome.lit.eval_vqa`) compute their numbers with these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import __version__

__all__ = ["RESULT_SCHEMA", "clip_benchmark_names", "fit_linear_probe", "result_record", "retrieval_recall_at_k"]

#: The results record: CLIP_benchmark's keys (``dataset``, ``model``, ``pretrained``, ``task``, ``metrics``,
#: ``language``) plus the protocol (templates, sizes, versions). Metric values are fractions in [0, 1].
RESULT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "mome-eval result (CLIP_benchmark schema; metrics are fractions in [0, 1])",
    "type": "object",
    "required": ["dataset", "model", "pretrained", "task", "metrics"],
    "properties": {
        "dataset": {"type": "string"},
        "model": {"type": "string"},
        "pretrained": {"type": "string"},
        "task": {"type": "string"},
        "language": {"type": "string"},
        "metrics": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "n_samples": {"type": "integer", "minimum": 1},
        "split": {"type": "string"},
        "weights": {"type": "string"},  # where the weights come from; "random initialisation": none (mome's field)
        "protocol": {"type": "object"},
        "cost": {  # one sample's cost (mome._flops): total and active parameters, active FLOPs (mome's field)
            "type": "object",
            "required": ["total_params", "active_params", "expert_params", "flops"],
            "additionalProperties": {"type": "integer", "minimum": 0},
        },
        "routing": {  # dropped share of the routed assignments of the MoE layers (mome's field)
            "type": "object",
            "required": ["eval_capacity", "dropped_fraction", "layers"],
            "properties": {
                "eval_capacity": {"type": ["string", "number"]},
                "dropped_fraction": {"type": "number", "minimum": 0, "maximum": 1},
                "layers": {"type": "object"},
            },
        },
        "param_count": {"type": "number"},
        "mome_version": {"type": "string"},
        "torch_version": {"type": "string"},
        "wall_time_s": {"type": "number"},
    },
}


def retrieval_recall_at_k(scores: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@k as the CLIP paper counts it (CLIP_benchmark's ``zeroshot_retrieval``): the share of queries
    with at least one positive among their ``k`` best-scored candidates.

    ``scores [Q, C]``: query x candidate similarities; ``positives [Q, C]`` bool (several per query allowed).
    With ``s*`` the best score of a query's positives, its rank is ``1 + #{negatives c: s_c >= s*}``: a
    negative tied with the best positive is ranked before it (so a model with constant scores gets no
    credit), and ``recall@k = mean_q [rank_q <= k]``. Without ties this is torchmetrics'
    ``RetrievalHitRate(top_k=k)``. A query without positives counts as a miss.
    """
    if scores.shape != positives.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} must be equal [Q, C]")
    positives = positives.bool()
    scores = scores.float()
    best_positive = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)  # [Q, 1]
    rank = 1 + ((scores >= best_positive) & ~positives).sum(dim=1)  # [Q]
    rank = rank.masked_fill(~positives.any(dim=1), scores.shape[1] + 1)
    return {int(k): float((rank <= k).float().mean()) for k in ks}


def fit_linear_probe(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, C: float = 1.0, max_iter: int = 1000
) -> Tensor:
    """Class probabilities ``[N_test, num_classes]`` of an L2-regularised multinomial logistic regression
    (scikit-learn ``LogisticRegression``, L-BFGS, inverse regularisation ``C``; CLIP's linear-probe protocol)
    fitted on standardised train features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    probe.fit(train_features.double().numpy(), train_labels.numpy())
    probs = torch.from_numpy(probe.predict_proba(test_features.double().numpy())).float()
    classes = torch.as_tensor(probe.classes_, dtype=torch.long)
    full = torch.zeros(probs.shape[0], int(max(classes.max(), train_labels.max())) + 1)  # classes absent from train
    full[:, classes] = probs
    return full


def result_record(
    metrics: Mapping[str, float],
    *,
    dataset: str,
    model: str,
    pretrained: str,
    task: str,
    n_samples: int,
    **extra: Any,
) -> dict[str, Any]:
    """One results record in the CLIP_benchmark schema (:data:`RESULT_SCHEMA`)."""
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": task,
        "metrics": {name: float(value) for name, value in metrics.items()},
        "language": "en",
        "n_samples": int(n_samples),
        "mome_version": __version__,
        "torch_version": torch.__version__,
        **extra,
    }


def clip_benchmark_names(metrics: Mapping[str, Tensor]) -> dict[str, float]:
    """torchmetrics' ``top1``/``top5`` as CLIP_benchmark's ``acc1``/``acc5``."""
    names = {"top1": "acc1", "top5": "acc5"}
    renamed = {names.get(k, k): float(v) for k, v in metrics.items()}
    return dict(sorted(renamed.items()))  # acc1, acc5, mean_per_class_recall
