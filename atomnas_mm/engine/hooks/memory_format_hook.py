"""Keep the model (and its EMA copy) in one memory format, channels_last by
default, from the first iteration on."""
from itertools import chain

import torch
from mmengine.hooks import EMAHook, Hook
from mmengine.model import is_model_wrapper

from ...registry import HOOKS

MEMORY_FORMATS = {'channels_last': torch.channels_last,
                  'contiguous': torch.contiguous_format}


def format_strides(shape, memory_format):
    """The strides ``Tensor.to(memory_format=...)`` gives a 4-D ``shape``.

    Exact also in size-1 dimensions, where ``is_contiguous(memory_format)``
    accepts both layouts: a 1x1 conv weight ``(O, I, 1, 1)`` is
    ``(I, 1, I, I)`` in channels_last. DDP's gradient buckets compare
    strides exactly.
    """
    n, c, h, w = shape
    if memory_format == 'channels_last':
        return (h * w * c, 1, w * c, c)
    return (c * h * w, h * w, w, 1)


def to_memory_format(module, memory_format):
    """Convert the 4-D parameters and buffers of ``module`` in place.

    ``Module.to(memory_format=...)`` keeps every parameter object (only its
    data is replaced), so optimizers, EMA copies and the shrink surgery's
    parameter maps stay valid.

    Args:
        module (nn.Module): Module to convert.
        memory_format (str): ``'channels_last'`` or ``'contiguous'``.

    Returns:
        bool: Whether any tensor was converted.
    """
    stale = any(t.dim() == 4 and t.numel() and
                t.stride() != format_strides(t.shape, memory_format)
                for t in chain(module.parameters(), module.buffers()))
    if stale:
        module.to(memory_format=MEMORY_FORMATS[memory_format])
    return stale


@HOOKS.register_module()
class MemoryFormatHook(Hook):
    """Train, validate and test in a memory format (channels_last).

    The shipped configs enable it in ``default_hooks``
    (``configs/_base_/default_runtime.py``); ``default_hooks =
    dict(memory_format=None)`` in a config (or ``--cfg-options
    default_hooks.memory_format.memory_format=contiguous``) turns it off.
    Measured gains are in docs/benchmarks.md.

    The model is converted at ``before_run`` (before EMAHook copies it, so
    the copy is converted too) and checked again at ``before_train``,
    ``before_val`` and ``before_test`` (after weight initialisation,
    ``load_from`` / ``--resume`` and any reshaping to a checkpoint's
    architecture); the EMA copy and 4-D optimizer state follow. Under DDP
    the model is re-wrapped after a conversion, so that the reducer's
    gradient buckets match the new strides. Inputs need no conversion: the
    data preprocessor's contiguous batch meets channels_last stem weights
    and the convolution returns channels_last, which every later layer
    keeps. The shrink surgery keeps each parameter's memory format.

    Args:
        memory_format (str): ``'channels_last'`` or ``'contiguous'``.
    """

    # Before EMAHook (ABOVE_NORMAL) and AtomShrinkHook (HIGH).
    priority = 'VERY_HIGH'

    def __init__(self, memory_format='channels_last'):
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f'memory_format: expected one of '
                             f'{sorted(MEMORY_FORMATS)}, got '
                             f'{memory_format!r}')
        self.memory_format = memory_format

    def before_run(self, runner):
        self.apply(runner)

    def before_train(self, runner):
        self.apply(runner)

    def before_val(self, runner):
        self.apply(runner)

    def before_test(self, runner):
        self.apply(runner)

    def apply(self, runner):
        """Convert the model, EMA copies and optimizer state where needed.

        Returns:
            bool: Whether the model was converted.
        """
        wrapped = is_model_wrapper(runner.model)
        model = runner.model.module if wrapped else runner.model
        changed = to_memory_format(model, self.memory_format)
        for hook in runner.hooks:
            if isinstance(hook, EMAHook) and hasattr(hook, 'ema_model'):
                to_memory_format(hook.ema_model.module, self.memory_format)
        self._convert_optimizer_state(runner)
        if changed:
            runner.logger.info(f'MemoryFormatHook: model converted to '
                               f'{self.memory_format}')
            if wrapped:
                runner.model = runner.wrap_model(
                    runner.cfg.get('model_wrapper_cfg'), model)
        return changed

    def _convert_optimizer_state(self, runner):
        wrapper = getattr(runner, 'optim_wrapper', None)
        if wrapper is None or isinstance(wrapper, dict):
            return  # not built yet (val / test only)
        wrappers = wrapper.values() if hasattr(wrapper, 'values') else \
            [wrapper]
        fmt = MEMORY_FORMATS[self.memory_format]
        for w in wrappers:
            for param, state in w.optimizer.state.items():
                for key, value in state.items():
                    if (torch.is_tensor(value) and value.dim() == 4
                            and value.shape == param.shape
                            and value.stride() != param.stride()):
                        state[key] = value.to(memory_format=fmt)
