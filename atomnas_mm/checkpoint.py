"""Keep mmengine checkpoints loadable with ``torch.load(weights_only=True)``.

mmengine 0.10.7 stores its message hub (``HistoryBuffer`` objects holding
numpy arrays) in every checkpoint. ``HistoryBuffer.__getstate__`` also adds the
class-wide table of statistics functions, which pickles as
``getattr(HistoryBuffer, 'min')`` and so needs ``builtins.getattr`` at load
time. Allowlisting ``getattr`` would let any checkpoint reach any attribute of
any allowlisted object, so instead:

* ``HistoryBuffer`` pickles without that table (``copyreg``): its
  ``__setstate__`` restores the default statistics anyway, and custom ones are
  registered on the class by the code that defines them. Checkpoints written
  in a process that imported atomnas_mm hold only data.
* Checkpoints written by stock mmengine (without atomnas_mm) carry the table;
  for them ``builtins.getattr`` resolves to :func:`history_buffer_getattr`,
  which returns only statistics functions of ``HistoryBuffer`` and rejects
  every other lookup.
* The remaining harmless types (``HistoryBuffer``, numpy arrays, scalars and
  dtypes) are allowlisted. ``weights_only`` stays on for every file.
"""
import copyreg
import pickle

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer


_STATISTICS = ('min', 'max', 'current', 'mean')  # HistoryBuffer's defaults


def _reduce_history_buffer(buffer):
    """Pickle a HistoryBuffer as its data only (no statistics functions)."""
    state = {k: v for k, v in vars(buffer).items()
             if k != 'statistics_methods'}
    return copyreg.__newobj__, (HistoryBuffer, ), state


def history_buffer_getattr(obj, name):
    """``getattr`` restricted to the statistics functions of HistoryBuffer.

    Stands in for ``builtins.getattr`` while unpickling with
    ``weights_only=True``.

    Raises:
        pickle.UnpicklingError: For any other object or attribute.
    """
    if obj is HistoryBuffer and name in _STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'getattr({obj!r}, {name!r}) is not allowed in a weights_only '
        'checkpoint (only HistoryBuffer statistics functions are)')


SAFE_GLOBALS = [
    HistoryBuffer,
    np.ndarray,
    np.dtype,
    np._core.multiarray._reconstruct,
    np._core.multiarray.scalar,
    (history_buffer_getattr, 'builtins.getattr'),
] + [type(np.dtype(t)) for t in (
    'float64', 'float32', 'float16', 'int64', 'int32', 'int16', 'int8',
    'uint8', 'bool')]

copyreg.pickle(HistoryBuffer, _reduce_history_buffer)
torch.serialization.add_safe_globals(SAFE_GLOBALS)
