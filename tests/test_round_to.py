"""Hardware-aligned widths (``round_to``): every shrink leaves each channel
group a multiple of N, the budget counts with it and still lands, a target
an aligned net cannot reach is refused, and the setting survives resume."""
import json
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest
import torch

from atomnas_mm.search.budget import BudgetController
from atomnas_mm.search.costs import FLOPsCost
from atomnas_mm.search.shrink import (apply_plan, plan_from_strengths,
                                      width_cost_of)
from atomnas_mm.search.units import find_units, unit_widths
from harness import ROOT, budget_cfg, build, shrink_hook, supernet_flops


def mobilenet_v2():
    from mmpretrain.models import MobileNetV2
    torch.manual_seed(0)
    model = MobileNetV2()
    model.eval()  # mmpretrain's train() returns None
    return model


def aligned(widths, before, n):
    """Every group that changed is a multiple of ``n``."""
    return all(w % n == 0 for name in widths
               for w, b in zip(widths[name], before[name]) if w != b)


@pytest.mark.parametrize('n', [1, 8])
def test_dead_channels_round_up_to_multiples(n):
    model = mobilenet_v2()
    units = find_units(model)
    before = unit_widths(units)
    torch.manual_seed(1)
    strengths = {name: torch.rand(u.num_channels) for name, u in units.items()}
    plan = plan_from_strengths(model, strengths, 0.3, units, round_to=n)
    dead = {name: int((s <= 0.3).sum()) for name, s in strengths.items()}
    for name, keep in plan.items():
        alive = units[name].num_channels - dead[name]
        # the strongest dead channels make the width up, never more
        assert len(keep) == min(units[name].num_channels,
                                max(n, -(-alive // n) * n))
        kept_dead = [c for c in keep.tolist() if strengths[name][c] <= 0.3]
        if kept_dead:
            weakest_kept = min(strengths[name][c] for c in kept_dead)
            gone = set(range(units[name].num_channels)) - set(keep.tolist())
            assert all(strengths[name][c] <= weakest_kept for c in gone)
    apply_plan(model, plan)
    assert aligned(unit_widths(find_units(model)), before, n)
    assert len(plan) == sum(
        1 for name, u in units.items() if dead[name] and (
            -(-(u.num_channels - dead[name]) // n) * n < u.num_channels))


def test_atomnas_kernel_groups_round_to_multiples():
    from atomnas_mm.models import AtomNAS
    from harness import SUPERNET
    model = AtomNAS(arch=SUPERNET)
    units = find_units(model)
    before = unit_widths(units)
    torch.manual_seed(2)
    strengths = {name: torch.rand(u.num_channels) for name, u in units.items()}
    plan = plan_from_strengths(model, strengths, 0.5, units, round_to=4)
    assert plan
    apply_plan(model, plan)
    after = unit_widths(find_units(model))
    assert aligned(after, before, 4) and after != before


@pytest.mark.parametrize('fraction', [0.3, 0.5])
def test_cap_lands_on_target_with_aligned_widths(fraction):
    """The deadline's cut (every channel a candidate) with round_to=8 lands
    within 2% above the target, every unit it touches a multiple of 8."""
    model = mobilenet_v2()
    cost = FLOPsCost(32)
    widths = width_cost_of(model, cost)
    before = {name: list(w) for name, w in widths.state.items()}
    target = fraction * widths.total
    controller = BudgetController(dict(flops=target), input_size=32,
                                  round_to=8)
    controller.start(widths)
    torch.manual_seed(3)
    strengths = {name: torch.rand(u.num_channels)
                 for name, u in widths.units.items()}
    everything = {n: torch.ones_like(s, dtype=torch.bool)
                  for n, s in strengths.items()}
    plan, after = controller.cap(widths, strengths, everything)
    assert target <= after <= 1.02 * target
    apply_plan(model, plan)
    assert cost.total(model) == pytest.approx(after, rel=1e-9)
    assert aligned(unit_widths(find_units(model)), before, 8)


def test_cap_with_round_to_one_removes_single_channels():
    """round_to=1 is the channel-by-channel cap (no chunking)."""
    model = mobilenet_v2()
    cost = FLOPsCost(32)
    widths = width_cost_of(model, cost)
    target = 0.9 * widths.total
    controller = BudgetController(dict(flops=target), input_size=32)
    controller.start(widths)
    strengths = {name: torch.arange(u.num_channels, dtype=torch.float)
                 for name, u in widths.units.items()}
    one_dead = {n: s < 1 for n, s in strengths.items()}  # channel 0 each
    plan, _ = controller.cap(widths, strengths, one_dead)
    assert plan and all(len(keep) == widths.units[n].num_channels - 1
                        for n, keep in plan.items())
    # with round_to=8 a single dead channel waits for seven more
    widths = width_cost_of(mobilenet_v2(), cost)
    controller = BudgetController(dict(flops=target), input_size=32,
                                  round_to=8)
    plan, after = controller.cap(widths, strengths, one_dead)
    assert plan == {} and after == widths.total


def test_unreachable_aligned_target_is_refused():
    model = mobilenet_v2()
    widths = width_cost_of(model, FLOPsCost(32))
    low1, _ = BudgetController(dict(flops=1.0), input_size=32).reachable(
        widths)
    low8, high = BudgetController(dict(flops=1.0), input_size=32,
                                  round_to=8).reachable(widths)
    assert low1 < low8 < high
    target = (low1 + low8) / 2  # reachable channel by channel only
    BudgetController(dict(flops=target), input_size=32).start(widths)
    with pytest.raises(ValueError, match=r'round_to=8.*|reachable range'):
        BudgetController(dict(flops=target), input_size=32,
                         round_to=8).start(widths)


@pytest.mark.parametrize('value', [0, 2.5, True, -8])
def test_bad_round_to_is_refused(value):
    from atomnas_mm.engine.hooks.shrink_hook import AtomShrinkHook
    with pytest.raises(ValueError, match='round_to'):
        AtomShrinkHook(round_to=value)


def test_round_to_through_the_runner_and_resume(tmp_path):
    """A budget search on the toy supernet with round_to=4: every kernel
    group it shrinks is a multiple of 4, the target lands, and a resume
    comes back to the same architecture."""
    target = 0.6 * supernet_flops()
    cfg = budget_cfg(str(tmp_path), dict(flops=target))
    cfg['custom_hooks'][-1]['round_to'] = 4
    runner = build(cfg)
    before = unit_widths(find_units(runner.model))
    runner.train()
    hook = shrink_hook(runner)
    assert target <= hook.history[-1]['flops'] <= 1.02 * target
    after = unit_widths(find_units(runner.model))
    assert after != before and aligned(after, before, 4)
    # resumed from the middle of the search, it ends where the run did
    part = str(tmp_path / 'part')
    os.makedirs(part)
    shutil.copy(osp.join(str(tmp_path), 'epoch_2.pth'), part)
    cfg = budget_cfg(part, dict(flops=target), resume=True,
                     load_from=osp.join(part, 'epoch_2.pth'))
    cfg['custom_hooks'][-1]['round_to'] = 4
    resumed = build(cfg)
    resumed.train()
    assert unit_widths(find_units(resumed.model)) == after


@pytest.mark.slow
@pytest.mark.skipif(not osp.isdir('/usr/share/datasets/fashion-mnist'),
                    reason='needs the Debian package dataset-fashion-mnist '
                    '(tools/install.sh installs it when apt is available)')
def test_mobilenet_v2_demo_with_round_to_through_train_py(tmp_path):
    """The MobileNetV2 demo search, shortened, with round_to=8 from the
    command line: every width the search changed is a multiple of 8 in
    every checkpoint, and the FLOPs target lands within 2%."""
    work = tmp_path / 'work'
    cache = tmp_path / 'data'
    cfg = osp.join(ROOT, 'configs/demo/mobilenet-v2_fashion_mnist_search.py')
    cmd = [sys.executable, osp.join(ROOT, 'tools/train.py'), cfg,
           '--work-dir', str(work), '--cfg-options',
           'train_cfg.max_epochs=2', 'train_dataloader.batch_size=32',
           'train_dataloader.dataset.indices=256',
           'val_dataloader.dataset.indices=32',
           f'train_dataloader.dataset.cache_dir={cache}',
           f'val_dataloader.dataset.cache_dir={cache}',
           'train_dataloader.num_workers=0', 'val_dataloader.num_workers=0',
           'train_dataloader.persistent_workers=False',
           'val_dataloader.persistent_workers=False',
           'param_scheduler.0.end=2', 'param_scheduler.1.T_max=2',
           'default_hooks.checkpoint.max_keep_ckpts=2',
           'custom_hooks.2.round_to=8', 'custom_hooks.2.interval=2',
           'custom_hooks.3.num_batches=1']
    out = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    from mmengine.config import Config
    from mmpretrain.registry import MODELS
    stock = unit_widths(find_units(MODELS.build(Config.fromfile(cfg).model)))
    for epoch in (1, 2):
        meta = torch.load(work / f'epoch_{epoch}.pth',
                          weights_only=True)['meta']
        changed = {n: w for n, w in meta['channel_units'].items()
                   if w != stock[n]}
        assert changed and all(x % 8 == 0 for w in changed.values()
                               for x in w), changed
    assert json.loads((work / 'searched_arch.json').read_text(
    ))['channel_units'] == meta['channel_units']
    target = 1.71e6  # the config's
    assert target <= meta['atomnas_history'][-1]['flops'] <= 1.02 * target
