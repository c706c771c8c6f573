"""Search policy as small registered parts (registry ``SEARCH``).

* a *criterion* says which atoms are dead;
* a *trigger* says whether removing them is worth a shrink now;
* a *schedule* gives the penalty strength ``rho`` at an iteration.

Hooks build them from configs (``dict(type='ThresholdCriterion', ...)``) and
only call them; write a new part and register it to change the policy.
"""
import math

import torch

from ..registry import SEARCH


def check_number(name, value, low=0.0, integer=False):
    """Raise ValueError naming ``name`` unless ``value`` is a finite number
    ``>= low`` (an int when ``integer``); return it."""
    ok = isinstance(value, int) if integer else isinstance(value,
                                                           (int, float))
    if (not ok or isinstance(value, bool) or not math.isfinite(value)
            or value < low):
        kind = 'an int' if integer else 'a finite number'
        raise ValueError(f'{name}: must be {kind} >= {low}, got {value!r}')
    return value


@SEARCH.register_module()
class ThresholdCriterion:
    """An atom is dead when its depthwise-BN ``|gamma| <= threshold``.

    During training it must be dead in the live AND the EMA weights; at the
    final shrink the EMA weights alone decide (they are what is evaluated).

    Args:
        threshold (float): Dead-atom threshold on ``|gamma|``.
    """

    def __init__(self, threshold=1e-3):
        self.threshold = check_number('threshold', threshold)

    def live_and_ema(self, live, ema=None, final=False):
        """The per-channel strength that :meth:`dead` judges: during
        training the larger of the live and the EMA ``|gamma|`` (a channel
        dies only when dead in both), at the final shrink the EMA's alone.

        Args:
            live (Tensor): ``|gamma|`` of the live weights.
            ema (Tensor, optional): ``|gamma|`` of the EMA weights.
            final (bool): Decide on ``ema`` alone.
        """
        if ema is None:
            return live
        return ema if final else torch.maximum(live, ema)

    def dead(self, strength):
        """Boolean mask of dead atoms."""
        return strength <= self.threshold


@SEARCH.register_module()
class MinFLOPsTrigger:
    """Shrink when the dead channels weigh at least ``min_removed_flops``
    multiply-adds (whatever the search's cost model), and always at the
    final shrink.

    Args:
        min_removed_flops (float): Minimum removed FLOPs.
    """

    def __init__(self, min_removed_flops=1e6):
        self.min_removed_flops = check_number('min_removed_flops',
                                              min_removed_flops)

    def __call__(self, removed_flops, final=False):
        return final or removed_flops >= self.min_removed_flops


@SEARCH.register_module()
class LinearRampSchedule:
    """``rho(t) = rho * min(1, t / warmup_iters)``; no ramp when 0.

    Args:
        rho (float): Final strength.
        warmup_iters (int): Length of the ramp in iterations.
    """

    def __init__(self, rho, warmup_iters=0):
        self.rho = float(check_number('rho', rho))
        self.warmup_iters = check_number('warmup_iters', warmup_iters,
                                         integer=True)

    def __call__(self, iteration):
        if self.warmup_iters <= 0:
            return self.rho
        return self.rho * min(1.0, iteration / self.warmup_iters)


def build_part(cfg, default, name):
    """A policy part from a config dict (or an object), else ``default``."""
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return SEARCH.build(cfg)
    if callable(cfg) or hasattr(cfg, 'dead') or hasattr(cfg, 'atom_costs'):
        return cfg
    raise ValueError(f'{name}: expected a config dict with "type", got '
                     f'{cfg!r}')
