"""mmengine models of daft-mm; importing this module registers them in mmengine's MODELS."""
from .daft_model import DAFTModel, default_predictors, mm_forward, resolve_stage

__all__ = ['DAFTModel', 'default_predictors', 'mm_forward', 'resolve_stage']
