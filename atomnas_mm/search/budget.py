"""Budget control: reach a FLOPs / params / latency target by a deadline, then hold it.

:class:`BudgetController` is a policy part of :class:`AtomShrinkHook`
(``target=dict(flops=300e6)``). At every check it measures the *live cost*
(the model's cost without the channels that are dead now) and steers the
penalty strength multiplicatively along a linear path from the initial cost
to the target: the scale is multiplied by ``(live / aim) ** gain``, where
the aim is the path that reaches the target at ``lead`` of the deadline (a
margin for the delay between a stronger penalty and the channels' death),
and kept in ``[1e-3, max_scale]`` (a scale far above the path's needs
crushes every cheap channel while the costly ones hold out; measured in
docs/benchmarks.md, "Budget controller: live cost against its path"). It
caps every shrink: only the weakest dead channels go, down to the target,
never below. At the first check at or after the deadline a net still above
the target loses its weakest channels (live ones too) down to it. Once a
shrink leaves the net within the tolerance the controller has *landed*: the
penalty is off (factor 0) and the rest of training fine-tunes the net at
its final size; the remaining dead channels may regrow.
"""
import math

import torch

from ..registry import SEARCH
from .costs import FLOPsCost, ParamsCost, latency_cost
from .policy import check_number

TARGET_KEYS = ('flops', 'params', 'latency_ms')


@SEARCH.register_module()
class BudgetController:
    """Steer ``rho`` so the searched backbone lands on a cost target.

    Args:
        target (dict): Exactly one of ``flops`` (multiply-adds of the
            backbone at ``input_size``), ``params`` (of the backbone) or
            ``latency_ms`` (predicted from ``latency_table``).
        deadline (float): Fraction of the training iterations by which the
            target is reached, in (0, 1].
        tolerance (float): Relative landing tolerance (the net ends in
            ``[target, target * (1 + tolerance)]``).
        gain (float): Exponent of the live cost's ratio to its aim in the
            scale's step at each check.
        lead (float): The aim reaches the target at this fraction of the
            deadline, in (0, 1].
        max_scale (float): The largest factor on the penalty schedule.
        input_size (int): Image side for FLOPs.
        latency_table (str | dict, optional): The table of a latency target
            (``tools/analysis_tools/atom_latency_table.py``): per AtomNAS
            block (:class:`~atomnas_mm.search.costs.LatencyCost`) or per
            layer of a stock model's channel units
            (:class:`~atomnas_mm.search.costs.LayerLatencyCost`).
        round_to (int): Every shrink leaves each channel group's width a
            multiple of this (a group narrower than it keeps its width);
            the range, the cap and the deadline's cut count with it.
    """

    def __init__(self, target, deadline=0.5, tolerance=0.02, gain=8.0,
                 lead=0.9, max_scale=100.0, input_size=224,
                 latency_table=None, round_to=1):
        if not isinstance(target, dict) or len(target) != 1 or \
                next(iter(target)) not in TARGET_KEYS:
            raise ValueError(f'target: expected a dict with one key of '
                             f'{sorted(TARGET_KEYS)}, got {target!r}')
        (self.key, value), = target.items()
        self.target = float(check_number(f'target.{self.key}', value, 1e-12))
        self.deadline = check_number('deadline', deadline, 1e-9)
        if self.deadline > 1:
            raise ValueError(f'deadline: a fraction of training in (0, 1], '
                             f'got {deadline!r}')
        self.tolerance = check_number('tolerance', tolerance)
        if not 0 < self.tolerance <= 0.5:
            # the net lands in [target, target * (1 + tolerance)]
            raise ValueError(
                f'tolerance: must be in (0, 0.5], got {tolerance!r}: the net '
                'lands anywhere in [target, target * (1 + tolerance)]; with 0 '
                'it never lands (shrinks stop at or above the target, rarely '
                'on it, so the penalty never turns off), above 0.5 a net far '
                'above the target lands (5 lands the supernet at the first '
                'check with nothing removed)')
        self.gain = check_number('gain', gain)
        self.lead = check_number('lead', lead, 1e-9)
        if self.lead > 1:
            raise ValueError(f'lead: a fraction of the deadline in (0, 1], '
                             f'got {lead!r}')
        self.max_scale = check_number('max_scale', max_scale, 1.0)
        self.round_to = check_number('round_to', round_to, 1, integer=True)
        if self.key == 'latency_ms':
            if latency_table is None:
                raise ValueError('latency_table: a latency_ms target needs '
                                 'the table measured on the target device')
            self.cost = latency_cost(latency_table)
        elif self.key == 'flops':
            self.cost = FLOPsCost(input_size)
        else:
            self.cost = ParamsCost()
        self.scale = 1.0
        self.initial_cost = None
        self.landed = False

    # -- range ------------------------------------------------------------------
    def reachable(self, widths):
        """``(smallest, largest)`` cost the model can reach (widths rounded
        to ``round_to``).

        Args:
            widths (WidthCost): The model's cost by unit widths
                (:func:`~atomnas_mm.search.shrink.width_cost_of`).
        """
        return widths.smallest(self.round_to), widths.total

    def start(self, widths):
        """Check the target against the model (fresh run); raise a
        ValueError naming the value and the reachable range, or saying that
        the model meets the target already. Returns the range."""
        low, high = self.reachable(widths)
        if not low <= self.target <= high:
            raise ValueError(
                f'target: {self.key}={self.target:.6g} is outside the '
                f'reachable range [{low:.6g}, {high:.6g}] of this model '
                f'(smallest net: every unit at its minimum width: residual '
                f'AtomNAS blocks emptied, one channel left in the others' + (
                    f', {self.round_to} with round_to={self.round_to}'
                    if self.round_to > 1 else '') + ')')
        if self.lands(high):
            raise ValueError(
                f'target: {self.key}={self.target:.6g} with tolerance '
                f'{self.tolerance:g} is met by this model as it is ({high:.6g}'
                '): the search would land at its first check with nothing '
                'removed; lower the target or the tolerance')
        self.initial_cost = widths.total
        return low, high

    # -- control ----------------------------------------------------------------
    def path(self, progress):
        """The cost the search should have at ``progress`` in [0, 1]."""
        done = min(1.0, progress / self.deadline)
        return self.initial_cost + (self.target - self.initial_cost) * done

    @property
    def factor(self):
        """The factor on the penalty schedule: the scale, 0 once landed."""
        return 0.0 if self.landed else self.scale

    def due(self, progress, final=False, live_cost=None):
        """Whether this check must land the net: at the deadline, at the end,
        or as soon as the live cost is within the tolerance (the channels
        the penalty killed would otherwise wait for the EMA copy and
        regrow)."""
        return not self.landed and (
            final or progress >= self.deadline or
            live_cost is not None and self.lands(live_cost))

    def update(self, live_cost, progress):
        """One control step from the measured live cost; returns the scale
        of the penalty strength (unchanged once landed)."""
        if self.landed:
            return self.scale
        aim = self.path(progress / self.lead)
        error = math.log(max(live_cost, 1e-12) / aim)
        self.scale = min(self.max_scale, max(1e-3, self.scale * math.exp(
            self.gain * max(-1.0, min(1.0, error)))))
        return self.scale

    def lands(self, cost):
        """Whether a net of ``cost`` is within the tolerance of the target."""
        return cost <= self.target * (1 + self.tolerance)

    def cap(self, widths, strengths, candidates, floor=None):
        """The channels to remove: the weakest of ``candidates`` (per unit a
        bool mask), while the net stays at or above the target.

        Every removal is costed exactly at the widths reached so far (a
        latency block is not the sum of its atoms, a conv between two units
        costs their product). With ``round_to`` > 1 the channels of a group
        go in chunks that leave its width a multiple of ``round_to`` (the
        first chunk of a group of another width is its remainder): a chunk
        goes when its weakest ``round_to`` candidates are gathered, or not
        at all.

        Args:
            widths (WidthCost): The model's cost by unit widths (consumed:
                it ends in the planned state).
            strengths (dict[str, Tensor]): Per unit, per-channel strengths.
            candidates (dict[str, Tensor]): Per unit, removable channels.
            floor (float, optional): The cost not to go below (default: the
                target).

        Returns:
            tuple[dict[str, Tensor], float]: A plan ``{unit: kept channel
            indices}`` and the model's cost after it.
        """
        floor = self.target if floor is None else max(floor, self.target)
        order = []
        for name, mask in candidates.items():
            for channel in torch.nonzero(mask).flatten().tolist():
                order.append((float(strengths[name][channel]), len(order),
                              name, channel))
        order.sort()
        group_of, removed, gathered = {}, {}, {}
        for name in candidates:
            group_of[name] = [g for g, (_, h) in enumerate(
                widths.units[name].groups) for _ in range(h)]
            removed[name] = []
        for _, _, name, channel in order:
            unit, group = widths.units[name], group_of[name][channel]
            chunk = gathered.setdefault((name, group), [])
            chunk.append(channel)
            width = widths.state[name][group]
            if len(chunk) < (width % self.round_to or self.round_to):
                continue
            gathered[name, group] = []
            if sum(widths.state[name]) - len(chunk) < unit.min_width or \
                    widths.total + widths.removal(name, group, len(chunk)) \
                    < floor:
                continue
            widths.remove(name, group, len(chunk))
            removed[name].extend(chunk)
        plan = {}
        for name, channels in removed.items():
            if channels:
                keep = torch.ones(widths.units[name].num_channels,
                                  dtype=torch.bool)
                keep[channels] = False
                plan[name] = torch.nonzero(keep).flatten()
        return plan, widths.total

    # -- checkpoints ------------------------------------------------------------
    def state_dict(self):
        return dict(scale=self.scale, initial_cost=self.initial_cost,
                    landed=self.landed)

    def load_state_dict(self, state):
        self.scale = float(state['scale'])
        self.initial_cost = state['initial_cost']
        self.landed = bool(state.get('landed', False))  # older checkpoints
