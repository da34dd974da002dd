"""mmengine models of daft-mm; importing this module registers them in mmengine's MODELS."""
from .daft_model import DAFTModel

__all__ = ['DAFTModel']
