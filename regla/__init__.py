"""The ReGLA model family (ELRF convolutions + RGMA linear attention), registered in timm on import."""
from .regla import ELRF, RGMA, ReGLA

__all__ = ["ELRF", "RGMA", "ReGLA"]
