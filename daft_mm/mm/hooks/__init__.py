"""mmengine hooks of daft-mm; importing this module registers them in mmengine's HOOKS."""
from .daft_hook import DAFTHook
from .distortion_hook import DistortionHook

__all__ = ['DAFTHook', 'DistortionHook']
