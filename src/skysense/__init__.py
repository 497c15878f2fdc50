"""SkySense: a multi-modal, spatiotemporal remote-sensing foundation model (Guo et al., CVPR 2024)."""

from skysense.config import SkySenseConfig, preset_config
from skysense.models import SkySense
from skysense.sinkhorn import sinkhorn_knopp

__version__ = "0.1.0"

__all__ = ["SkySense", "SkySenseConfig", "preset_config", "sinkhorn_knopp", "__version__"]
