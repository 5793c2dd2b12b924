"""mome: a model zoo for multimodal mixture-of-experts models.

``import mome`` loads the library only (torch, timm); transformers is imported when a MoE-LLaVA model is
looked up, and training (Lightning) and the command line (Hydra) live in ``mome.lit`` and ``mome.cli``,
imported on demand. The timm-contract families (V-MoE, Soft-MoE ViT) are also registered in timm's own
registry, so ``timm.create_model("vmoe_s32_e8")`` works after ``import mome``.
"""

from . import _timm
from . import compress as compress  # expert pruning and merging (mome.compress.prune_experts, merge_experts)
from . import models as models  # registers the families (MoE-LLaVA lazily)
from ._checkpoint import load_checkpoint as load_checkpoint
from ._errors import CardError as CardError
from ._errors import CheckpointFormatError as CheckpointFormatError
from ._errors import CheckpointMismatchError as CheckpointMismatchError
from ._errors import ChecksumMismatchError as ChecksumMismatchError
from ._errors import CorruptCheckpointError as CorruptCheckpointError
from ._errors import DeviceMapError as DeviceMapError
from ._errors import DownloadError as DownloadError
from ._errors import InvalidArgumentError as InvalidArgumentError
from ._errors import InvalidInputError as InvalidInputError
from ._errors import MomeError as MomeError
from ._errors import NonFiniteWeightsError as NonFiniteWeightsError
from ._errors import PretrainedUnavailableError as PretrainedUnavailableError
from ._errors import ProcessorMismatchError as ProcessorMismatchError
from ._errors import UnknownModelError as UnknownModelError
from ._errors import UnsafeCheckpointError as UnsafeCheckpointError
from ._errors import UnsupportedModelError as UnsupportedModelError
from ._errors import UnsupportedOptionError as UnsupportedOptionError
from ._factory import create_model as create_model
from ._factory import fetch_pretrained as fetch_pretrained
from ._factory import get_tokenizer as get_tokenizer
from ._factory import load_checkpoint_file as load_checkpoint_file
from ._factory import parse_model_name as parse_model_name
from ._pretrained import PretrainedCfg as PretrainedCfg
from ._quantize import quantization_of as quantization_of
from ._quantize import quantize as quantize
from ._registry import add_zoo_dir as add_zoo_dir
from ._registry import get_pretrained_cfg as get_pretrained_cfg
from ._registry import is_model as is_model
from ._registry import list_models as list_models
from ._registry import list_pretrained as list_pretrained
from ._registry import model_entrypoint as model_entrypoint
from ._registry import register_lazy_family as register_lazy_family
from ._registry import register_model as register_model
from ._registry import register_pretrained_cfg as register_pretrained_cfg
from ._registry import split_model_name_tag as split_model_name_tag
from ._resources import conf_dir as conf_dir
from ._resources import zoo_dir as zoo_dir
from ._saving import push_to_hub as push_to_hub
from ._saving import save_pretrained as save_pretrained
from ._upcycle import upcycle as upcycle
from .layers import aux_losses as aux_losses
from .layers import routing_stats as routing_stats

_timm.register_timm_families()  # timm.create_model("vmoe_s32_e8") works after import mome

__version__ = "0.1.0"
