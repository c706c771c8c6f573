"""The search object (atomnas_mm.search.planner): a check's decision from a
model alone, without a Runner."""
import pytest
import torch
from mmpretrain.models import MobileNetV2
from mmpretrain.registry import MODELS

import atomnas_mm  # noqa: F401
from atomnas_mm.search.budget import BudgetController
from atomnas_mm.search.costs import FLOPsCost
from atomnas_mm.search.planner import ShrinkPlanner
from atomnas_mm.search.policy import MinFLOPsTrigger, ThresholdCriterion
from atomnas_mm.search.shrink import apply_plan, backbone_cost, channel_widths
from atomnas_mm.search.units import ResidualUnit, find_units
from harness import build, make_cfg, shrink_hook


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


@pytest.mark.slow  # two tiny ResNet-18 searches through the Runner
def test_resnet_streams_are_searched_when_a_config_names_their_finder(
        tmp_path):
    """By default a search leaves a ResNet's stage channels (its streams)
    alone; ``AtomShrinkHook(finders=[...ResNetStreamFinder])`` searches
    them too; either way the budget lands."""
    model = dict(
        type='ImageClassifier',
        backbone=dict(type='ResNet', depth=18, base_channels=8,
                      stem_channels=8),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=4, in_channels=64))
    widths = {}
    for opt_in in (False, True):
        cfg = make_cfg(str(tmp_path / str(opt_in)), max_epochs=2,
                       model=model)
        hooks = cfg['custom_hooks']
        hooks[1].update(min_removed_flops=None, follow_path=True,
                        deadline=0.5, interval=2, by_epoch=False)
        if opt_in:
            hooks[1]['finders'] = [dict(type='ResNetFinder'),
                                   dict(type='ResNetStreamFinder')]
        hooks.insert(1, dict(type='atomnas_mm.BNL1PenaltyHook', rho=1e-3,
                             warmup_epochs=0))
        full = backbone_cost(MODELS.build(model), FLOPsCost(32))
        hooks[2]['target'] = dict(flops=0.5 * full)
        runner = build(cfg)
        streams = {n for n, u in find_units(runner.model).items()
                   if isinstance(u, ResidualUnit)}
        runner.train()
        assert streams
        assert 0.5 * full <= shrink_hook(runner).history[-1]['flops'] <= \
            1.02 * 0.5 * full
        penalty = next(h for h in runner.hooks
                       if type(h).__name__ == 'BNL1PenaltyHook')
        assert bool(streams & set(penalty.units)) == opt_in
        widths[opt_in] = channel_widths(runner.model)
    start = channel_widths(MODELS.build(model))
    assert all(widths[False][n] == start[n] for n in streams)
    assert any(widths[True][n] != start[n] for n in streams)
