"""SkySense pretraining objectives (Guo et al., CVPR 2024).

The authors never released pretraining code. Each objective is one small module; where the paper
is silent the choice comes from the DINO (Caron et al., 2021), iBOT (Zhou et al., 2022), SwAV
(Caron et al., 2020) and CLIP (Radford et al., 2021) lineage and is stated in its docstring.
"""

from skysense.pretrain.cross_modal import CrossModalAlignment
from skysense.pretrain.dino_loss import CenteredCrossEntropy
from skysense.pretrain.geo_prototypes import GeoPrototypeLoss
from skysense.pretrain.heads import DINOHead
from skysense.pretrain.image_contrast import ImageContrastLoss
from skysense.pretrain.object_contrast import ObjectContrastLoss
from skysense.pretrain.objective import HeadConfig, PretrainObjectiveConfig, SkySensePretrainingObjective
from skysense.pretrain.pixel_contrast import PixelContrastLoss, resample_to_overlap
from skysense.pretrain.teacher import build_teacher, cosine_momentum, ema_update

__all__ = [
    "CenteredCrossEntropy",
    "CrossModalAlignment",
    "DINOHead",
    "GeoPrototypeLoss",
    "HeadConfig",
    "ImageContrastLoss",
    "ObjectContrastLoss",
    "PixelContrastLoss",
    "PretrainObjectiveConfig",
    "SkySensePretrainingObjective",
    "build_teacher",
    "cosine_momentum",
    "ema_update",
    "resample_to_overlap",
]
