"""Building blocks shared by several models."""
from .mil_attention import GatedAttention, masked_softmax, tile_grid

__all__ = ["GatedAttention", "masked_softmax", "tile_grid"]
