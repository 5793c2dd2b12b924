"""mome's model families, one per file; importing this package registers every variant."""

from . import limoe as limoe
from . import moe_llava as moe_llava
from . import soft_moe_vit as soft_moe_vit
from . import vlmo as vlmo
from . import vmoe as vmoe
from ._moe_vit import MoEVisionTransformer as MoEVisionTransformer
from ._moe_vit import resolve_moe_layers as resolve_moe_layers
