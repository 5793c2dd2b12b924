"""mome: a model zoo for multimodal mixture-of-experts models.

``import mome`` loads the library only (torch, timm); training (Lightning) and the command line
(Hydra) live in ``mome.lit`` and ``mome.cli`` and are imported on demand.
"""

from . import models as models  # registers every family
from ._registry import CheckpointMismatchError as CheckpointMismatchError
from ._registry import ChecksumMismatchError as ChecksumMismatchError
from ._registry import CorruptCheckpointError as CorruptCheckpointError
from ._registry import PretrainedCfg as PretrainedCfg
from ._registry import PretrainedUnavailableError as PretrainedUnavailableError
from ._registry import UnknownModelError as UnknownModelError
from ._registry import UnsafeCheckpointError as UnsafeCheckpointError
from ._registry import add_zoo_dir as add_zoo_dir
from ._registry import create_model as create_model
from ._registry import fetch_pretrained as fetch_pretrained
from ._registry import get_pretrained_cfg as get_pretrained_cfg
from ._registry import is_model as is_model
from ._registry import list_models as list_models
from ._registry import list_pretrained as list_pretrained
from ._registry import model_entrypoint as model_entrypoint
from ._registry import push_to_hub as push_to_hub
from ._registry import register_model as register_model
from ._registry import register_pretrained_cfg as register_pretrained_cfg
from ._registry import save_pretrained as save_pretrained
from ._registry import split_model_name_tag as split_model_name_tag
from ._resources import conf_dir as conf_dir
from ._resources import zoo_dir as zoo_dir
from ._tokenizer import get_tokenizer as get_tokenizer
from ._upcycle import upcycle as upcycle
from .layers import aux_losses as aux_losses
from .layers import routing_stats as routing_stats

__version__ = "0.1.0"
