"""Latency tables: measure -> predict round trip, the cost model, the tool,
and a latency budget through the Runner."""
import json
import logging
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch
from mmengine.hooks import EMAHook, Hook

from atomnas_mm.models import AtomNAS
from atomnas_mm.search.budget import BudgetController
from atomnas_mm.search.costs import LatencyCost
from atomnas_mm.search.shrink import (apply_plan, removed_cost,
                                      searchable_blocks, width_cost_of)
from atomnas_mm.search.latency import measure_table, random_subnet
from harness import SUPERNET, budget_cfg, build, shrink_hook, train_logging

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def measured():
    net = AtomNAS(arch=SUPERNET).eval()
    return net, measure_table(net, input_size=32, samples=2,
                              min_run_time=0.01, progress=False)


def test_round_trip_on_a_tiny_net(measured):
    net, table = measured
    assert len(table['blocks']) == len(net.blocks())
    assert table['blocks'][1]['kernels'].keys() == {'3', '5', '7'}
    total = sum(h for _, h in net.blocks()[1].atom_groups())
    # the narrowest width (is emptying the block worth it?) and 2 samples
    assert table['blocks'][1]['kernels']['3']['widths'] == \
        [1, total // 2, total]
    cost = LatencyCost(json.loads(json.dumps(table)))  # JSON round trip
    # In eval mode a block runs as one group of its largest kernel at its
    # total width: the supernet is predicted as those samples.
    assert cost.total(net) == pytest.approx(
        table['stem_ms'] + table['head_ms'] + sum(
            e['kernels'][str(max(k for k, _ in b.atom_groups()))]['ms'][-1]
            for e, b in zip(cost.table['blocks'], net.blocks())))
    # A net with one kernel group per block at a sampled width is predicted
    # as exactly the sum of its measured parts.
    arch = net.arch_dict()
    for row, entry in zip(arch['rows'], table['blocks']):
        k = row[3][0]
        row[3], row[4] = [k], [entry['kernels'][str(k)]['widths'][-1]]
    single = AtomNAS(arch=arch)
    # (the cost model's copy of the table: noise-free monotone curves)
    want = table['stem_ms'] + table['head_ms'] + sum(
        e['kernels'][str(r[3][0])]['ms'][-1]
        for e, r in zip(cost.table['blocks'], arch['rows']))
    assert all(c['ms'] == sorted(c['ms']) for e in cost.table['blocks']
               for c in e['kernels'].values())
    assert cost.total(single) == pytest.approx(want)
    # Fewer atoms never cost more; every atom costs >= 0.
    assert cost.total(AtomNAS(arch=random_subnet(net))) <= cost.total(net)
    assert all(c is None or (c >= 0).all() for c in cost.atom_costs(net))


def test_table_of_another_net_is_refused(measured):
    _, table = measured
    other = AtomNAS(arch=dict(SUPERNET, stem_channels=16,
                              rows=[[16, 1, 1, [3], [16], False]]
                              + SUPERNET['rows'][1:]))
    with pytest.raises(ValueError, match=r'table: block 0 was measured with \(in, '
                       r'out, stride\) \(8, 8, 1\)'):
        LatencyCost(table).total(other)
    with pytest.raises(ValueError, match=r'table: version None, expected 2'):
        LatencyCost({k: v for k, v in table.items() if k != 'version'})
    with pytest.raises(ValueError, match='cannot read the latency table'):
        LatencyCost('/nonexistent/table.json')


@pytest.mark.slow
def test_tool_measures_and_predicts(tmp_path):
    out = tmp_path / 'table.json'
    cmd = [sys.executable,
           osp.join(ROOT, 'tools/analysis_tools/atom_latency_table.py'),
           osp.join(ROOT, 'configs/demo/atomnas_fashion_mnist.py'),
           '--out', str(out), '--samples', '2', '--min-run-time', '0.01',
           '--predict', '--subnets', '2']
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    table = json.loads(out.read_text())
    assert table['input_size'] == 28 and table['in_channels'] == 1
    lines = [line for line in run.stdout.splitlines()
             if line.startswith(('supernet', 'random sub-net'))]
    assert len(lines) == 3 and all('%' in line for line in lines)


def synthetic_table(net, per_atom=0.01):
    """A table whose block latency is 0.1 ms + per_atom ms per atom."""
    blocks = []
    for i, block in enumerate(net.blocks()):
        total = sum(h for _, h in block.atom_groups())
        kernels = {str(k): dict(widths=[total], ms=[0.1 + per_atom * total])
                   for k, _ in block.atom_groups()}
        blocks.append(dict(index=i, geometry=[block.in_channels,
                                              block.out_channels,
                                              block.stride],
                           kernels=kernels, base_ms=0.1,
                           empty_ms=0.0 if block.use_res else 0.1))
    return dict(version=2, device='cpu', batch=1, input_size=32,
                in_channels=3, stem_ms=0.5, head_ms=0.5, blocks=blocks)


def test_cap_costs_latency_removals_exactly():
    """Block latency is not the sum of its atoms' slopes (curves whose first
    atom costs most, one curve per block): the cap costs each removal with
    the table and its predicted total is the shrunk net's."""
    net = AtomNAS(arch=SUPERNET)
    table = synthetic_table(net)
    for entry, block in zip(table['blocks'], net.blocks()):
        total = sum(h for _, h in block.atom_groups())
        if total > 1:
            for k, _ in block.atom_groups():
                entry['kernels'][str(k)] = dict(widths=[1, total],
                                                ms=[0.3, 0.6])
    cost = LatencyCost(table)
    total = cost.total(net)
    controller = BudgetController(dict(latency_ms=0.9 * total),
                                  latency_table=table)
    gen = torch.Generator().manual_seed(0)
    strengths = {name: torch.rand(block.num_atoms, generator=gen)
                 for name, block in searchable_blocks(net).items()}
    candidates = {name: torch.ones_like(s, dtype=torch.bool)
                  for name, s in strengths.items()}
    plan, after = controller.cap(width_cost_of(net, cost), strengths,
                                 candidates)
    removed = removed_cost(net, plan, cost)  # the slopes' estimate
    apply_plan(net, plan)
    assert cost.total(net) == pytest.approx(after, rel=1e-9)
    assert controller.target <= after <= controller.target * 1.02
    # the slopes (the penalty weights) misjudge what the removals save
    assert abs(removed - (total - after)) > 0.2 * (total - after)


def test_latency_target_lands_through_the_runner(tmp_path):
    net = AtomNAS(arch=SUPERNET)
    table = synthetic_table(net)
    path = tmp_path / 'table.json'
    path.write_text(json.dumps(table))
    supernet_ms = LatencyCost(table).total(net)
    target = 0.85 * supernet_ms  # reachable: [0.72, 1] of it
    cfg = budget_cfg(str(tmp_path / 'work'), dict(latency_ms=target))
    cfg['custom_hooks'][2]['latency_table'] = str(path)
    runner = build(cfg)
    messages = train_logging(runner, logging.INFO)
    predicted = LatencyCost(table).total(runner.model.backbone)
    assert target <= predicted <= target * 1.02
    assert any(re.search(r'AtomShrinkHook: removed \d+ atoms \([0-9.e+-]+ ms '
                         r'by LatencyCost\)', m) for m in messages), messages
    # The penalty weights are the table's per-atom latencies (all equal).
    weights = runner.model.backbone.blocks()[1].penalty_weight
    assert weights.numel() == 0 or weights.std() < 1e-6
    assert shrink_hook(runner).history[0]['cost'] == pytest.approx(
        supernet_ms)


class KillOneGroup(Hook):
    """Zeroes one kernel group's gammas (live and EMA) just before the
    first check."""
    priority = 'VERY_HIGH'

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter == 1:
            ema = next(h for h in runner.hooks if isinstance(h, EMAHook))
            for model in (runner.model, ema.ema_model.module):
                block = model.backbone.blocks()[1]
                next(iter(block.dw.values())).norm.weight.data.zero_()


def test_latency_trigger_weighs_removals_in_flops(tmp_path):
    """min_removed_flops counts FLOPs with a latency target: a group of a
    few hundred multiply-adds (a fraction of a ms) passes 100."""
    net = AtomNAS(arch=SUPERNET)
    path = tmp_path / 'table.json'
    path.write_text(json.dumps(synthetic_table(net)))
    cfg = budget_cfg(str(tmp_path / 'work'), dict(
        latency_ms=0.85 * LatencyCost(str(path)).total(net)))
    cfg['custom_hooks'][2].update(latency_table=str(path),
                                  min_removed_flops=100)
    runner = build(cfg, [KillOneGroup()])
    runner.train()
    history = shrink_hook(runner).history
    assert history[1]['iter'] == 2  # the killed group went at once
    assert history[1]['flops'] < history[0]['flops']


def test_latency_target_needs_a_table(tmp_path):
    cfg = budget_cfg(str(tmp_path), dict(latency_ms=1.0))
    with pytest.raises(ValueError, match='latency_table: a latency_ms '
                       'target needs'):
        build(cfg)
