"""The search object (atomnas_mm.search.planner): a check's decision from a
model alone, without a Runner."""
import torch
from mmpretrain.models import MobileNetV2

import atomnas_mm  # noqa: F401
from atomnas_mm.search.budget import BudgetController
from atomnas_mm.search.costs import FLOPsCost
from atomnas_mm.search.planner import ShrinkPlanner
from atomnas_mm.search.policy import MinFLOPsTrigger, ThresholdCriterion
from atomnas_mm.search.shrink import apply_plan, backbone_cost
from atomnas_mm.search.units import find_units


def planner(target=None, min_removed_flops=0.0, **kwargs):
    flops = FLOPsCost(32)
    controller = None if target is None else BudgetController(
        dict(flops=target), deadline=0.5, input_size=32)
    return ShrinkPlanner(ThresholdCriterion(1e-3),
                         MinFLOPsTrigger(min_removed_flops),
                         flops if controller is None else controller.cost,
                         flops, controller, **kwargs)


def check(p, model, progress, final=False):
    units = find_units(model)
    widths, costs = p.costing(model, units)
    step = p.plan(model, units, widths, costs, progress=progress,
                  final=final)
    return step, costs


def test_without_a_budget_dead_channels_go_when_they_weigh_enough():
    model = MobileNetV2(widen_factor=0.25)
    unit = find_units(model)['layer2.0.conv.1.bn']
    with torch.no_grad():
        unit.gate.weight[:5] = 0
    step, costs = check(planner(), model, 0.1)
    assert list(step.plan) == ['layer2.0.conv.1.bn']
    assert step.plan['layer2.0.conv.1.bn'].tolist() == list(
        range(5, unit.num_channels))
    assert not step.lands and step.live is None
    removed = planner().removed(model, step.plan, costs)
    assert removed > 0
    assert planner(min_removed_flops=removed).fires(model, step.plan, costs)
    assert not planner(min_removed_flops=removed + 1).fires(
        model, step.plan, costs)
    assert not planner().fires(model, {}, costs)


def test_following_the_path_cuts_to_it_then_lands_at_the_deadline():
    model = MobileNetV2(widen_factor=0.25)
    full = backbone_cost(model, FLOPsCost(32))
    p = planner(target=0.4 * full, follow_path=True)
    p.controller.start(p.costing(model, find_units(model))[0])
    step, _ = check(p, model, 0.25)  # nothing dead: live channels go
    apply_plan(model, step.plan)
    after = backbone_cost(model, FLOPsCost(32))
    assert p.controller.path(0.25) <= after < full
    assert after <= p.controller.path(0.25) * 1.02
    assert not step.lands and not step.cut and step.live == full
    step, _ = check(p, model, 0.5)  # the deadline: down to the target
    assert step.cut and step.lands
    apply_plan(model, step.plan)
    assert 0.4 * full <= backbone_cost(model, FLOPsCost(32)) <= \
        0.4 * full * 1.02
