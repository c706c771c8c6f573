"""What a shrink check decides: which channels go, and how the budget steers.

:class:`ShrinkPlanner` is the search object: it owns the policy parts of a
search (criterion, trigger, cost model, the budget controller) and turns the
model (and its EMA copy) at some point of training into a :class:`Step`: the
plan, whether it lands the net on the target, the live cost. It knows no
Runner and no process group: :class:`~atomnas_mm.AtomShrinkHook` decides on
rank 0 with it, broadcasts the step and applies it everywhere.
"""
from typing import NamedTuple, Optional

import torch

from .costs import FLOPsCost
from .shrink import (atom_costs, atom_strengths, plan_from_strengths,
                     removed_cost, width_cost_of)
from .units import AtomUnit, find_units, finder_parts, require_units


class Step(NamedTuple):
    """One check's decision.

    Attributes:
        plan (dict): ``{unit name: kept indices}`` of the units that shrink.
        lands (bool): The plan leaves the net on the budget target.
        live (float | None): With a target: the cost without the channels
            dead in the live weights now.
        cut (bool): With a target: due (deadline or end) while the live
            cost is above it, so live channels go down to the target.
    """
    plan: dict
    lands: bool = False
    live: Optional[float] = None
    cut: bool = False


class ShrinkPlanner:
    """The policy of a search, without the training loop.

    Args:
        criterion: Marks dead channels from their strengths.
        trigger: Whether the dead channels weigh enough to shrink (fed
            their FLOPs).
        cost: The cost model of the budget and the logs.
        flops (FLOPsCost): The trigger's FLOPs count.
        controller (BudgetController, optional): The budget.
        follow_path (bool): With a budget: above the controller's path, the
            weakest channels (dead or not) go down to it; the penalty is not
            steered.
        round_to (int): Every shrunk group keeps a multiple of this width.
        finders (list, optional): The finders of the searched units (parts
            or config dicts; default
            :data:`~atomnas_mm.search.finders.SEARCH_FINDERS`).
    """

    def __init__(self, criterion, trigger, cost, flops=None, controller=None,
                 follow_path=False, round_to=1, finders=None):
        self.criterion = criterion
        self.trigger = trigger
        self.cost = cost
        self.flops = flops or FLOPsCost()
        self.controller = controller
        self.follow_path = follow_path
        self.round_to = round_to
        if finders is None:
            from .finders import SEARCH_FINDERS
            finders = SEARCH_FINDERS
        self.finders = tuple(finder_parts(finders))

    def units(self, model, where=None):
        """The searched units of ``model``; with ``where``, refused with
        :class:`SearchRefused` naming it when there is none."""
        if where is not None:
            return require_units(model, self.finders, where)
        return find_units(model, self.finders)

    def costing(self, model, units):
        """The model's cost by unit widths (None when nothing needs it:
        AtomNAS atoms without a budget) and the per-channel costs, costed
        once for the whole check."""
        widths = width_cost_of(model, self.cost, units) if (
            self.controller is not None or not all(
                isinstance(u, AtomUnit) for u in units.values())) else None
        return widths, atom_costs(model, self.cost, units, widths)

    def plan(self, model, units, widths, costs, ema=None, progress=0.0,
             final=False):
        """Decide a check; with a budget, step its controller.

        Args:
            model (nn.Module): The (unwrapped) model.
            units (dict): Its units (:func:`find_units`).
            widths (WidthCost): From :meth:`costing` (consumed).
            costs (dict): Per-channel costs, from :meth:`costing`.
            ema (nn.Module, optional): The EMA copy (its vote in the
                criterion; alone at the final check).
            progress (float): Iterations done over the total.
            final (bool): The check after the last iteration.

        Returns:
            Step: The decision.
        """
        strengths = atom_strengths(model, self.criterion, ema,
                                   final=final and ema is not None,
                                   units=units)
        if self.controller is None:
            return Step(plan_from_strengths(model, strengths, self.criterion,
                                            units, round_to=self.round_to))
        controller = self.controller
        # The live cost counts channels dead in the live weights: the EMA
        # copy lags the penalty by its averaging window, a controller would
        # wind up waiting for it.
        dead_now = plan_from_strengths(
            model, atom_strengths(model, self.criterion, units=units),
            self.criterion, units)
        live = widths.total - removed_cost(model, dead_now, self.cost, costs)
        if not self.follow_path:  # the removals follow the path instead
            controller.update(live, progress)
        # When due, the weakest channels go down to the target, dead or not
        # (the EMA copy may still lag the live weights).
        force = controller.due(progress, final, live)
        cut = force and not controller.lands(live)
        floor = None
        if not force and self.follow_path and not controller.landed and \
                widths.total > controller.path(progress):
            # behind the path: the weakest channels go down to it
            force, floor = True, controller.path(progress)
        candidates = {name: torch.ones_like(s, dtype=torch.bool) if force
                      else self.criterion.dead(s)
                      for name, s in strengths.items()}
        plan, after = controller.cap(widths, strengths, candidates, floor)
        return Step(plan, controller.lands(after), live, cut)

    def removed(self, model, plan, costs):
        """What ``plan`` removes by the cost model."""
        return removed_cost(model, plan, self.cost, costs)

    def fires(self, model, plan, costs, lands=False, final=False):
        """Whether ``plan`` is applied: it lands the net, or the trigger
        agrees (fed the plan's FLOPs, whatever the cost model)."""
        if not plan:
            return False
        return lands or self.trigger(removed_cost(
            model, plan, self.flops,
            costs if self.cost is self.flops else None), final)
