"""Issue 20, point 3: values that disable or break the search are refused
with a message naming the field (and the file for a latency table)."""
import json
import math
import os
import os.path as osp
import subprocess
import sys

import pytest

from atomnas_mm.datasets import DEBIAN_ROOT
from atomnas_mm.models import AtomNAS
from atomnas_mm.search.budget import BudgetController
from atomnas_mm.search.costs import LatencyCost
from atomnas_mm.search.latency import measure_table
from harness import SUPERNET

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.mark.parametrize('tolerance, why', [
    (0, 'with 0 it never lands'), (0.0, 'with 0 it never lands'),
    (5, '5 lands the supernet'), (0.51, 'above 0.5 a net far above'),
    (-0.1, 'must be a finite number >= 0'), (math.nan, 'must be a finite')])
def test_tolerance_outside_its_bounds_is_refused(tolerance, why):
    with pytest.raises(ValueError, match=r'^tolerance: must be ') as info:
        BudgetController(dict(flops=1e6), tolerance=tolerance)
    assert why in str(info.value)


@pytest.mark.parametrize('tolerance', [1e-3, 0.02, 0.5])
def test_tolerance_within_its_bounds_is_accepted(tolerance):
    assert BudgetController(dict(flops=1e6),
                            tolerance=tolerance).tolerance == tolerance


@pytest.fixture(scope='module')
def table():
    net = AtomNAS(arch=SUPERNET).eval()
    return net, measure_table(net, input_size=32, samples=2,
                              min_run_time=0.001, progress=False)


def write(tmp_path, table):
    path = tmp_path / 'latency.json'
    path.write_text(json.dumps(table))  # NaN/Infinity as JSON allows them
    return str(path)


@pytest.mark.parametrize('field, value, why', [
    ("blocks[1].kernels['5'].ms[0]", -0.2, 'a latency cannot be negative'),
    ("blocks[1].kernels['5'].ms[0]", math.nan, 'a latency must be finite'),
    ("blocks[1].kernels['5'].ms[0]", math.inf, 'a latency must be finite'),
    ("blocks[1].kernels['5'].ms[0]", 1e300, 'over 1e+06 ms'),
    ("blocks[1].kernels['5'].ms[0]", '0.3', 'must be a number'),
    ('blocks[0].base_ms', math.nan, 'a latency must be finite'),
    ('blocks[2].empty_ms', -1.0, 'a latency cannot be negative'),
    ('stem_ms', math.nan, 'a latency must be finite'),
    ('head_ms', None, 'must be a number'),
])
def test_a_bad_latency_sample_is_refused_naming_file_and_field(
        tmp_path, table, field, value, why):
    _, good = table
    bad = json.loads(json.dumps(good))
    if field.startswith('blocks[1].kernels'):
        bad['blocks'][1]['kernels']['5']['ms'][0] = value
    elif field.startswith('blocks['):
        i, key = int(field[7]), field.split('.')[1]
        bad['blocks'][i][key] = value
    else:
        bad[field] = value
    path = write(tmp_path, bad)
    with pytest.raises(ValueError) as info:
        LatencyCost(path)
    message = str(info.value)
    assert message.startswith(f'table: {path}: {field} = ')
    assert why in message
    assert 'atom_latency_table.py' in message
    LatencyCost(write(tmp_path, good))  # the intact table loads


def test_bad_widths_are_refused(tmp_path, table):
    _, good = table
    bad = json.loads(json.dumps(good))
    widths = bad['blocks'][1]['kernels']['3']['widths']
    widths[1] = widths[0]  # one sample per width still, not increasing
    with pytest.raises(ValueError, match=r"blocks\[1\]\.kernels\['3'\]\."
                       rf"widths = \[{widths[0]}, {widths[0]}, .*\]: must be "
                       r"increasing"):
        LatencyCost(write(tmp_path, bad))


def test_a_table_of_another_net_names_its_file(tmp_path, table):
    net, good = table
    extra = json.loads(json.dumps(good))
    extra['blocks'].append(extra['blocks'][-1])
    path = write(tmp_path, extra)
    n = len(good['blocks'])
    with pytest.raises(ValueError, match=(
            rf'^table: {n + 1} blocks in {path}, the backbone has {n}; ')):
        LatencyCost(path).total(net)


@pytest.mark.slow
@pytest.mark.skipif(not osp.isdir(DEBIAN_ROOT),
                    reason='needs the Debian package dataset-fashion-mnist')
def test_train_with_a_nan_latency_table_stops_naming_it(tmp_path, table):
    """tools/train.py with a latency target and a table holding NaN stops
    before training; the error names the table file and the sample."""
    _, good = table
    bad = json.loads(json.dumps(good))
    bad['blocks'][1]['kernels']['3']['ms'][1] = math.nan
    path = write(tmp_path, bad)
    config = tmp_path / 'latency_demo.py'
    config.write_text(
        f"_base_ = [{osp.join(ROOT, 'configs/demo/atomnas_fashion_mnist.py')!r}]\n"
        "custom_hooks = [\n"
        "    dict(type='EMAHook', momentum=0.05, update_buffers=True,\n"
        "         priority='ABOVE_NORMAL'),\n"
        "    dict(type='atomnas_mm.BNL1PenaltyHook', rho=3e-3,\n"
        "         warmup_epochs=0.5),\n"
        "    dict(type='atomnas_mm.AtomShrinkHook', target=dict(latency_ms="
        f"1.0), latency_table={path!r}, by_epoch=False, input_size=28),\n"
        "]\n")
    work_dir = str(tmp_path / 'work')
    done = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools/train.py'), str(config),
         '--work-dir', work_dir, '--cfg-options',
         f"train_dataloader.dataset.cache_dir={tmp_path / 'cache'}",
         f"val_dataloader.dataset.cache_dir={tmp_path / 'cache'}"],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert f"table: {path}: blocks[1].kernels['3'].ms[1] = nan: a latency " \
        'must be finite' in last, done.stderr[-3000:]
    assert not [f for f in os.listdir(work_dir) if f.endswith('.pth')]
