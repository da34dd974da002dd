"""Small helpers of the tools and the OpenMMLab layer (standard library only)."""
from .io import (WorkDirBusyError, WorkDirLock, atomic_save, atomic_write, atomic_write_json,
                 file_digest, same_file)

__all__ = ['WorkDirBusyError', 'WorkDirLock', 'atomic_save', 'atomic_write', 'atomic_write_json',
           'file_digest', 'same_file']
