"""Budget control: reach a FLOPs / params target by a deadline, then hold it.

:class:`BudgetController` is a policy part of :class:`AtomShrinkHook`
(``target=dict(flops=300e6)``). At every check it measures the *live cost*
(the backbone's cost without the atoms that are dead now) and steers the
penalty strength multiplicatively towards a linear path from the initial
cost to the target at the deadline; after the deadline the path is the
target, so a net under it lets atoms regrow. It also caps every shrink: only
the weakest dead atoms go, down to the target, never below; at the final
shrink the weakest atoms go until the net is at the target.
"""
import math

import torch

from ..registry import SEARCH
from .costs import FLOPsCost, LatencyCost, ParamsCost
from .policy import check_number

COSTS = {'flops': FLOPsCost, 'params': ParamsCost, 'latency_ms': LatencyCost}


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
        gain (float): Log-scale step of the strength per unit of relative
            error at each check.
        input_size (int): Image side for FLOPs.
        latency_table (str | dict, optional): The table of a latency target
            (``tools/analysis_tools/atom_latency_table.py``).
    """

    def __init__(self, target, deadline=0.5, tolerance=0.02, gain=4.0,
                 input_size=224, latency_table=None):
        if not isinstance(target, dict) or len(target) != 1 or \
                next(iter(target)) not in COSTS:
            raise ValueError(f'target: expected a dict with one key of '
                             f'{sorted(COSTS)}, got {target!r}')
        (self.key, value), = target.items()
        self.target = float(check_number(f'target.{self.key}', value, 1e-12))
        self.deadline = check_number('deadline', deadline, 1e-9)
        if self.deadline > 1:
            raise ValueError(f'deadline: a fraction of training in (0, 1], '
                             f'got {deadline!r}')
        self.tolerance = check_number('tolerance', tolerance)
        self.gain = check_number('gain', gain)
        if self.key == 'latency_ms':
            if latency_table is None:
                raise ValueError('latency_table: a latency_ms target needs '
                                 'the table measured on the target device')
            self.cost = LatencyCost(latency_table)
        elif self.key == 'flops':
            self.cost = FLOPsCost(input_size)
        else:
            self.cost = ParamsCost()
        self.scale = 1.0
        self.initial_cost = None

    # -- range ------------------------------------------------------------------
    def reachable(self, total, atom_costs, blocks):
        """``(smallest, largest)`` cost this backbone can reach."""
        removable = 0.0
        for name, costs in atom_costs.items():
            removable += costs.sum().item()
            if not blocks[name].use_res:  # keeps its cheapest atom
                removable -= costs.min().item()
        return total - removable, total

    def start(self, total, atom_costs, blocks):
        """Check the target against the backbone (fresh run); raise a
        ValueError naming the value and the reachable range."""
        low, high = self.reachable(total, atom_costs, blocks)
        if not low <= self.target <= high:
            raise ValueError(
                f'target: {self.key}={self.target:.6g} is outside the '
                f'reachable range [{low:.6g}, {high:.6g}] of this supernet '
                f'(smallest net: every residual block emptied, one atom '
                f'left in the others)')
        self.initial_cost = total

    # -- control ----------------------------------------------------------------
    def path(self, progress):
        """The cost the search should have at ``progress`` in [0, 1]."""
        done = min(1.0, progress / self.deadline)
        return self.initial_cost + (self.target - self.initial_cost) * done

    def update(self, live_cost, progress):
        """One control step from the measured live cost; returns the scale
        of the penalty strength."""
        span = max(self.initial_cost - self.target, 1e-12)
        error = (live_cost - self.path(progress)) / span
        self.scale = min(1e3, max(1e-3, self.scale * math.exp(
            self.gain * max(-1.0, min(1.0, error)))))
        return self.scale

    def cap(self, total, strengths, atom_costs, blocks, candidates):
        """The atoms to remove: the weakest of ``candidates`` (per block a
        bool mask), while the net stays at or above the target.

        Returns:
            dict[str, Tensor]: A plan ``{block: kept atom indices}``.
        """
        names, index, strength, cost = [], [], [], []
        for n, (name, mask) in enumerate(candidates.items()):
            ids = torch.nonzero(mask).flatten()
            names.append(name)
            index.append(torch.stack([torch.full_like(ids, n), ids], 1))
            strength.append(strengths[name][ids].float().cpu())
            cost.append(atom_costs[name][ids].float().cpu())
        if not names:
            return {}
        index, strength, cost = (torch.cat(index), torch.cat(strength),
                                 torch.cat(cost))
        left = {name: blocks[name].num_atoms for name in names}
        removed = {name: [] for name in names}
        budget = total - self.target
        for i in torch.argsort(strength, stable=True).tolist():
            name, atom = names[index[i, 0]], int(index[i, 1])
            if cost[i] > budget:
                continue
            if left[name] == 1 and not blocks[name].use_res:
                continue
            budget -= cost[i].item()
            left[name] -= 1
            removed[name].append(atom)
        plan = {}
        for name, atoms in removed.items():
            if atoms:
                keep = torch.ones(blocks[name].num_atoms, dtype=torch.bool)
                keep[atoms] = False
                plan[name] = torch.nonzero(keep).flatten()
        return plan

    # -- checkpoints ------------------------------------------------------------
    def state_dict(self):
        return dict(scale=self.scale, initial_cost=self.initial_cost)

    def load_state_dict(self, state):
        self.scale = float(state['scale'])
        self.initial_cost = state['initial_cost']
