"""Building blocks shared by several models."""
from .mil_attention import GatedAttention, masked_softmax

__all__ = ["GatedAttention", "masked_softmax"]
