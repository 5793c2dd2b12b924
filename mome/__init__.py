"""mome: a model zoo for multimodal mixture-of-experts models.

``import mome`` loads the library only (torch, timm); training (Lightning) and the command line
(Hydra) live in ``mome.lit`` and ``mome.cli`` and are imported on demand.
"""

from ._resources import conf_dir as conf_dir
from ._resources import zoo_dir as zoo_dir
from .layers import aux_losses as aux_losses
from .layers import routing_stats as routing_stats

__version__ = "0.1.0"
