"""Keep mmengine checkpoints loadable with ``torch.load(weights_only=True)``.

mmengine 0.10.7 stores its message hub (``HistoryBuffer`` objects holding
numpy arrays) in every checkpoint. We allowlist exactly those harmless types;
weights_only stays on for every file.
"""
import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

SAFE_GLOBALS = [
    HistoryBuffer,
    np.ndarray,
    np.dtype,
    np._core.multiarray._reconstruct,
    np._core.multiarray.scalar,
] + [type(np.dtype(t)) for t in (
    'float64', 'float32', 'float16', 'int64', 'int32', 'int16', 'int8',
    'uint8', 'bool')]

torch.serialization.add_safe_globals(SAFE_GLOBALS)
