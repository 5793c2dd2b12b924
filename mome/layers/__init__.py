"""mome's layer library: routers, the capacity plan, stacked experts, MoE / Soft MoE / SMEAR / modality layers, losses.

Every model family of mome is assembled from these parts; each is usable on its own as a drop-in
FFN for timm blocks (``[B, N, D] -> [B, N, D]``).
"""

from . import losses as losses
from .dispatch import DispatchPlan as DispatchPlan
from .dispatch import compute_capacity as compute_capacity
from .dispatch import plan_dispatch as plan_dispatch
from .dispatch import weigh_kept as weigh_kept
from .expert_parallel import ShardedExperts as ShardedExperts
from .expert_parallel import expert_parameter_names as expert_parameter_names
from .expert_parallel import gather_expert_state_dict as gather_expert_state_dict
from .expert_parallel import shard_expert_state_dict as shard_expert_state_dict
from .expert_parallel import shard_experts as shard_experts
from .expert_parallel import unshard_experts as unshard_experts
from .experts import Dispatch as Dispatch
from .experts import Experts as Experts
from .experts import grouped_matmul as grouped_matmul
from .modality import ModalityLayerNorm as ModalityLayerNorm
from .modality import ModalityMoE as ModalityMoE
from .modality import MultiwayFFN as MultiwayFFN
from .moe import AUX_LOSSES as AUX_LOSSES
from .moe import MoE as MoE
from .moe import RoutedLayer as RoutedLayer
from .moe import SparseMoE as SparseMoE
from .moe import aux_losses as aux_losses
from .moe import eval_capacity as eval_capacity
from .moe import routing_stats as routing_stats
from .moe import timm_mlp_layer as timm_mlp_layer
from .moe import update_expert_biases as update_expert_biases
from .routers import BaseLayerRouter as BaseLayerRouter
from .routers import CausalRoutingError as CausalRoutingError
from .routers import ExpertChoiceRouter as ExpertChoiceRouter
from .routers import GShardTop2Router as GShardTop2Router
from .routers import HashRouter as HashRouter
from .routers import ModalityRouter as ModalityRouter
from .routers import NoisyTopKRouter as NoisyTopKRouter
from .routers import Router as Router
from .routers import Routing as Routing
from .routers import SinkhornRouter as SinkhornRouter
from .routers import TopKRouter as TopKRouter
from .routers import XMoERouter as XMoERouter
from .routers import balanced_assignment as balanced_assignment
from .routers import check_causal_safe as check_causal_safe
from .routers import sinkhorn_balance as sinkhorn_balance
from .smear import SMEAR as SMEAR
from .soft_moe import SoftMoE as SoftMoE
