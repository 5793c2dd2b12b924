"""mome: a model zoo for multimodal mixture-of-experts models.

``import mome`` loads the library only (torch, timm); training (Lightning) and the command line
(Hydra) live in ``mome.lit`` and ``mome.cli`` and are imported on demand.
"""

from . import models as models  # registers every family
from ._registry import CheckpointMismatchError as CheckpointMismatchError
from ._registry import PretrainedCfg as PretrainedCfg
from ._registry import PretrainedUnavailableError as PretrainedUnavailableError
from ._registry import UnknownModelError as UnknownModelError
from ._registry import create_model as create_model
from ._registry import get_pretrained_cfg as get_pretrained_cfg
from ._registry import is_model as is_model
from ._registry import list_models as list_models
from ._registry import list_pretrained as list_pretrained
from ._registry import model_entrypoint as model_entrypoint
from ._registry import register_model as register_model
from ._registry import register_pretrained_cfg as register_pretrained_cfg
from ._registry import save_pretrained as save_pretrained
from ._registry import split_model_name_tag as split_model_name_tag
from ._resources import conf_dir as conf_dir
from ._resources import zoo_dir as zoo_dir
from ._tokenizer import get_tokenizer as get_tokenizer
from .layers import aux_losses as aux_losses
from .layers import routing_stats as routing_stats

__version__ = "0.1.0"
