"""Every configuration the product cannot honour fails at build or in
before_train, naming the field and the value (issue: nothing silent)."""
import re

import pytest
import torch.nn as nn

from atomnas_mm.engine.hooks import AtomShrinkHook, BNL1PenaltyHook
from atomnas_mm.models import AtomNAS
from atomnas_mm.search import shrink_model
from harness import RecordHook, build, make_cfg, train_logging

ROW = [24, 1, 2, [3, 5], [8, 4], True]


def rows_with(**fields):
    names = ['out_channels', 'repeats', 'stride', 'kernel_sizes', 'hidden',
             'has_expand']
    row = list(ROW)
    for key, value in fields.items():
        row[names.index(key)] = value
    return dict(rows=[[16, 1, 1, [3], [8], False], row], stem_channels=8)


@pytest.mark.parametrize('kwargs, match', [
    (dict(arch=rows_with(has_expand='False')),
     r"row 1 has_expand must be a bool, got 'False'"),
    (dict(arch=rows_with(stride=2.0)), r'row 1 stride must be 1 or 2, got 2.0'),
    (dict(arch=rows_with(out_channels=True)),
     r'row 1 out_channels must be a positive int, got True'),
    (dict(arch=rows_with(kernel_sizes=3)),
     r'row 1 kernel_sizes must be a list, got 3'),
    (dict(arch=rows_with(hidden=[8, 4.5])),
     r'row 1 hidden width 4.5 must be a non-negative int'),
    (dict(out_indices=7), r'out_indices: must be a sequence of ints, got 7'),
    (dict(out_indices=(1.0, )), r'out_indices: 1.0 must be in range'),
    (dict(frozen_stages='1'), r"frozen_stages: '1' must be in range"),
    (dict(arch=dict(rows=[ROW], stem_channels='8')),
     r"arch: stem_channels must be a positive int, got '8'"),
    (dict(arch=dict(rows=[ROW], se_ratio=-1)),
     r'arch: se_ratio must be None or a positive number, got -1'),
    (dict(arch=dict(rows=[ROW], colour='red')), r"arch: unknown keys \['colour'\]"),
    (dict(arch=dict(rows=[ROW], stages=[[1, 16, 1, 1, [3]]])),
     r'"rows" or "stages" \(one of them\)'),
])
def test_backbone_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AtomNAS(**kwargs)


def test_missing_arch_keys_take_the_documented_defaults():
    net = AtomNAS(arch=dict(rows=[[16, 1, 1, [3], [32], False], ROW]))
    assert net.arch_dict() == dict(
        rows=[[16, 1, 1, [3], [32], False], ROW], stem_channels=32,
        last_channels=1280, in_channels=3, act_cfg=dict(type='ReLU'),
        se_ratio=None, stage_depths=[1, 1])


@pytest.mark.parametrize('hook, kwargs, match', [
    (AtomShrinkHook, dict(threshold='1e-3'),
     r"threshold: must be a finite number >= 0.0, got '1e-3'"),
    (AtomShrinkHook, dict(threshold=float('nan')), r'threshold: .* got nan'),
    (AtomShrinkHook, dict(input_size=0), r'input_size: must be a positive '
                                         r'int, got 0'),
    (AtomShrinkHook, dict(interval=0), r'interval: must be an int >= 1'),
    (AtomShrinkHook, dict(by_epoch='yes'), r"by_epoch: must be a bool"),
    (AtomShrinkHook, dict(min_removed_flops=-1), r'min_removed_flops: .* got -1'),
    (AtomShrinkHook, dict(threshold=1e-3, criterion=dict(
        type='ThresholdCriterion')), r'threshold: give it or the policy part'),
    (BNL1PenaltyHook, dict(rho='1e-4'), r"rho: must be a finite number"),
    (BNL1PenaltyHook, dict(rho=1e-4, warmup_iters='10'),
     r"warmup_iters: must be an int >= 0"),
    (BNL1PenaltyHook, dict(rho=-1), r'rho: .* got -1'),
    (BNL1PenaltyHook, dict(), r'rho: give rho \(linear ramp\) or schedule'),
])
def test_hook_arguments(hook, kwargs, match):
    with pytest.raises(ValueError, match=match):
        hook(**kwargs)


@pytest.mark.parametrize('threshold', [-1, float('nan'), 'x'])
def test_shrink_model_threshold(threshold):
    net = AtomNAS(arch=rows_with())
    before = net.arch_dict()
    with pytest.raises(ValueError, match='threshold: must be a finite number'):
        shrink_model(net, threshold=threshold)
    assert net.arch_dict() == before


def _fails_before_training(cfg, match, tmp_path):
    record = RecordHook()
    with pytest.raises((ValueError, TypeError), match=match):
        build(cfg, [record]).train()
    assert record.losses == []


def test_by_epoch_shrink_in_an_iteration_loop(tmp_path):
    cfg = make_cfg(str(tmp_path))
    cfg['train_cfg'] = dict(by_epoch=False, max_iters=4)
    cfg['param_scheduler'] = None
    _fails_before_training(cfg, r'by_epoch=True needs an epoch-based train '
                           r'loop, got IterBasedTrainLoop', tmp_path)


def stock_cfg(tmp_path, backbone, channels):
    """The tiny search config with a stock mmpretrain backbone instead."""
    cfg = make_cfg(str(tmp_path))
    cfg['model']['backbone'] = backbone
    cfg['model']['head']['in_channels'] = channels
    return cfg


def test_penalty_on_a_model_without_units_names_what_it_refused(tmp_path):
    """ResNeXt's grouped convs couple its blocks' channels and its stem and
    stages are frozen (their streams would be units otherwise): nothing to
    search, and the error names the blocks and why."""
    cfg = stock_cfg(tmp_path, dict(type='ResNeXt', depth=50,
                                   frozen_stages=4), 2048)
    cfg['custom_hooks'] = [dict(type='atomnas_mm.BNL1PenaltyHook', rho=1e-4)]
    _fails_before_training(
        cfg, r'BNL1PenaltyHook: the model has no searchable channel unit:\n'
        r'  backbone.layer1.0: grouped conv \(ResNeXt\) couples its channel groups',
        tmp_path)


def test_shrink_on_a_frozen_model_names_what_it_refused(tmp_path):
    cfg = stock_cfg(tmp_path, dict(type='ResNet', depth=18, frozen_stages=4),
                    512)
    _fails_before_training(
        cfg, r'AtomShrinkHook: the model has no searchable channel unit:\n'
        r'  backbone.layer1.0.bn1: frozen \(requires_grad=False\)', tmp_path)


def test_a_failing_shrink_leaves_everything_as_it_was():
    """A plan that is wrong for one block changes no block."""
    from atomnas_mm.search import apply_plan
    import torch
    net = AtomNAS(arch=dict(rows=[[16, 1, 1, [3], [8], False],
                                  ROW, [24, 1, 1, [3], [6], True]],
                            stem_channels=8))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    params = list(net.parameters())
    plan = {'layer2.0': torch.tensor([0, 1]), 'layer2.1': torch.tensor([9])}
    with pytest.raises(ValueError, match=r'keep: atom indices must be .* in '
                       r'\[0, 6\), got \[9\]'):
        apply_plan(net, plan)
    assert list(net.parameters()) == params
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert isinstance(net.layer2[0].expand.conv, nn.Conv2d)


def test_a_target_near_the_floor_of_a_stock_model_is_warned_about(tmp_path):
    """A budget that leaves almost every unit at one channel trains, with a
    warning that says so, the floor and the full cost."""
    import logging

    from atomnas_mm.search.costs import FLOPsCost
    from atomnas_mm.search.finders import SEARCH_FINDERS
    from atomnas_mm.search.shrink import width_cost_of
    from atomnas_mm.search.units import find_units
    from mmpretrain.models import ResNet
    backbone = dict(type='ResNet', depth=18, base_channels=8,
                    stem_channels=8)
    net = ResNet(18, base_channels=8, stem_channels=8)
    floor = width_cost_of(net, FLOPsCost(32),
                          find_units(net, SEARCH_FINDERS)).smallest()
    cfg = stock_cfg(tmp_path, backbone, 64)
    cfg['train_cfg'] = dict(by_epoch=True, max_epochs=1, val_interval=1)
    cfg['custom_hooks'] = [dict(
        type='atomnas_mm.AtomShrinkHook', target=dict(flops=floor * 1.01),
        follow_path=True, interval=1, by_epoch=False, input_size=32)]
    runner = build(cfg)
    messages = train_logging(runner, logging.WARNING)
    assert any(re.search(r'AtomShrinkHook: the target [0-9.e+]+ is within '
                         r'10% of the smallest net this model allows', m)
               for m in messages), messages
    # below that floor: refused, naming the units the search leaves out
    cfg['custom_hooks'][0]['target'] = dict(flops=floor * 0.5)
    with pytest.raises(ValueError, match=r'outside the reachable range.*'
                       r'more units of this model are not searched by '
                       r'default \(e.g. backbone.layer1.0.bn2\): name their '
                       r'finders in AtomShrinkHook\(finders=...\)'):
        build(cfg).train()


def test_no_near_floor_warning_for_atomnas_blocks(tmp_path):
    """AtomNAS blocks empty whole residual blocks at the floor (not one
    channel each): a target near it is a normal search, not warned about."""
    from atomnas_mm.search.costs import FLOPsCost
    from atomnas_mm.search.shrink import width_cost_of
    from harness import SUPERNET, budget_cfg
    floor = width_cost_of(AtomNAS(arch=SUPERNET), FLOPsCost(32)).smallest()
    runner = build(budget_cfg(str(tmp_path), dict(flops=floor * 1.01)))
    messages = train_logging(runner)
    assert any('AtomShrinkHook: searching' in m for m in messages), messages
    assert not any('smallest net this model allows' in m for m in messages)
