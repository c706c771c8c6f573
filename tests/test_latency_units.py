"""Latency targets for stock models: per-layer latency tables of channel
units (LayerLatencyCost), their checks, the tool and a search through
tools/train.py."""
import copy
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from mmpretrain.models import MobileNetV2, ResNet

import atomnas_mm  # noqa: F401
from atomnas_mm.models import AtomNAS
from atomnas_mm.search.budget import BudgetController
from atomnas_mm.search.costs import (LatencyCost, LayerLatencyCost,
                                     latency_cost, layer_geometry,
                                     search_root, unit_layers)
from atomnas_mm.search.latency import (fit_layers, layer_widths,
                                       measure_layer_table)
from atomnas_mm.search.shrink import (apply_plan, backbone_cost,
                                      narrow_to_widths, width_cost_of)
from atomnas_mm.search.units import SearchRefused, find_units
from harness import ROOT, SUPERNET, demo_cmd, remove_at_random

MBV2_DEMO = osp.join(ROOT, 'configs/demo/mobilenet-v2_fashion_mnist_search.py')
TOOL = osp.join(ROOT, 'tools/analysis_tools/atom_latency_table.py')

STOCK = {
    'mobilenet-v2': lambda: MobileNetV2(widen_factor=0.5),
    'resnet-18': lambda: ResNet(18, base_channels=16, stem_channels=16),
}


def bilinear_ms(entry, c_in, c_out):
    """The hand-made latency of a layer: 0.01 ms + 1e-5 ms per input x
    output channel (a depthwise conv: 0.005 ms + 1e-4 ms per channel);
    bilinear in the widths, so interpolating its samples is exact."""
    if entry['depthwise']:
        return 0.005 + 1e-4 * c_out
    return 0.01 + 1e-5 * c_in * c_out


def synthetic_table(model, fixed_ms=0.5):
    """A per-layer table of ``model``'s channel units with
    :func:`bilinear_ms` samples at three widths per unit axis."""
    units = find_units(model)
    names = {id(m): n for n, m in search_root(model).named_modules()}
    layers = []
    for layer, src, dst, depthwise in unit_layers(model, units):
        entry = dict(name=names[id(layer)], **layer_geometry(layer),
                     depthwise=depthwise, input_size=[8, 8])
        c_in, c_out = entry['in_channels'], entry['out_channels']
        entry['in_widths'] = layer_widths(c_in, 2) if src and not \
            depthwise else [c_in]
        entry['out_widths'] = layer_widths(c_out, 2) if dst or depthwise \
            else [c_out]
        entry['ms'] = [[bilinear_ms(entry, a, b) for b in entry['out_widths']]
                       for a in entry['in_widths']]
        layers.append(entry)
    return dict(kind='layers', version=1, runtime='torch', threads=1,
                device='cpu', batch=1, input_shape=[1, 3, 32, 32],
                fixed_ms=fixed_ms, model_ms=1.0, layers=layers)


def expected_ms(table, model):
    """:func:`bilinear_ms` summed over the table's layers at ``model``'s
    widths, plus the fixed part: computed from the modules, not the cost."""
    modules = dict(search_root(model).named_modules())
    total = table['fixed_ms']
    for entry in table['layers']:
        layer = modules[entry['name']]
        total += bilinear_ms(entry, layer_geometry(layer)['in_channels'],
                             layer_geometry(layer)['out_channels'])
    return total


# -- the cost model on hand-made numbers --------------------------------------
def toy():
    """Two convs: the first one's outputs are resized (a unit's), the
    second one reads them."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.Conv2d(8, 6, 1))


def toy_table():
    return dict(
        kind='layers', version=1, runtime='torch', threads=1, device='cpu',
        batch=1, input_shape=[1, 3, 8, 8], fixed_ms=0.25, model_ms=5.0,
        layers=[
            # noise: 0.9 at width 4 below 1.0 at width 2
            dict(name='0', type='Conv2d', in_channels=3, out_channels=8,
                 kernel_size=[3, 3], stride=[1, 1], groups=1,
                 depthwise=False, in_widths=[3], out_widths=[2, 4, 8],
                 ms=[[1.0, 0.9, 2.0]]),
            dict(name='3', type='Conv2d', in_channels=8, out_channels=6,
                 kernel_size=[1, 1], stride=[1, 1], groups=1,
                 depthwise=False, in_widths=[1, 4, 8], out_widths=[2, 6],
                 ms=[[1.0, 2.0], [3.0, 5.0], [4.0, 4.5]])])


def test_interpolation_monotone_and_fixed_part_are_exact():
    cost = LayerLatencyCost(toy_table())
    # the running maximum along both axes: the noise is gone
    assert cost.entries['0']['ms'] == [[1.0, 1.0, 2.0]]
    assert cost.entries['3']['ms'] == [[1.0, 2.0], [3.0, 5.0], [4.0, 5.0]]
    net = toy()
    # full width: fixed + the last samples
    assert cost.total(net) == pytest.approx(0.25 + 2.0 + 5.0)
    # 6 channels out of the first conv: halfway between 4 and 8 (1.5);
    # the second conv at (6, 6): halfway between rows 4 and 8 at 6 (5.0)
    net[0] = nn.Conv2d(3, 6, 3, padding=1)
    net[3] = nn.Conv2d(6, 6, 1)
    assert cost.total(net) == pytest.approx(0.25 + 1.5 + 5.0)
    # bilinear inside a cell: (c_in 6, c_out 4): rows 4 and 8 at 4 are
    # 4.0 and 4.5, halfway 4.25
    positions = cost.layer_positions(net)
    assert cost.layer_cost(net[3], 6, 4, 1, positions[net[3]]) == \
        pytest.approx(4.25)
    # never below 0 past the narrowest sample, never falling with width
    assert cost.layer_cost(net[0], 3, 0, 1, positions[net[0]]) >= 0
    costs = [cost.layer_cost(net[3], a, b, 1, positions[net[3]])
             for a in range(1, 9) for b in range(1, 7)]
    grid = torch.tensor(costs).view(8, 6)
    assert (grid.diff(dim=0) >= -1e-12).all() and \
        (grid.diff(dim=1) >= -1e-12).all()


def test_fit_layers_passes_through_the_full_net():
    # whole nets: 1 + 2 * sum of their layers; the full one first
    points = [(3.0, 7.0), (1.0, 3.0), (2.0, 5.0)]
    assert fit_layers(points) == pytest.approx((2.0, 1.0))
    # a slope that leaves no fixed part: the full net predicted without one
    assert fit_layers([(2.0, 3.0), (1.0, 0.5)]) == pytest.approx((1.5, 0.0))


# -- stock models: the width cost and the total agree -------------------------
@pytest.mark.parametrize('name', sorted(STOCK))
def test_width_cost_predicts_the_shrunk_model(name):
    model = STOCK[name]()
    table = synthetic_table(model)
    cost = latency_cost(json.loads(json.dumps(table)))
    assert isinstance(cost, LayerLatencyCost)
    widths = width_cost_of(model, cost)
    assert widths.total == pytest.approx(expected_ms(table, model))
    plan = remove_at_random(widths)
    low = widths.smallest()
    apply_plan(model, plan)
    assert backbone_cost(model, cost) == pytest.approx(widths.total,
                                                      rel=1e-9)
    # the interpolation of bilinear samples is exact at any width
    assert widths.total == pytest.approx(expected_ms(table, model), rel=1e-9)
    assert table['fixed_ms'] < low < widths.total


def test_budget_caps_a_latency_target_on_a_stock_model():
    """The controller takes a per-layer table as latency_table and caps a
    plan at the target exactly by it."""
    model = STOCK['mobilenet-v2']()
    table = synthetic_table(model)
    full = LayerLatencyCost(table).total(model)
    controller = BudgetController(dict(latency_ms=0.7 * full),
                                  latency_table=table)
    assert isinstance(controller.cost, LayerLatencyCost)
    widths = width_cost_of(model, controller.cost)
    gen = torch.Generator().manual_seed(0)
    strengths = {n: torch.rand(u.num_channels, generator=gen)
                 for n, u in widths.units.items()}
    candidates = {n: torch.ones_like(s, dtype=torch.bool)
                  for n, s in strengths.items()}
    plan, after = controller.cap(widths, strengths, candidates)
    apply_plan(model, plan)
    assert controller.cost.total(model) == pytest.approx(after, rel=1e-9)
    assert controller.target <= after <= controller.target * 1.02


# -- refusals -----------------------------------------------------------------
def test_a_table_of_another_model_is_refused_naming_the_layer():
    table = synthetic_table(STOCK['resnet-18']())
    with pytest.raises(ValueError, match=r"table: the table given as a dict "
                       r"has layer '[\w.]+', which MobileNetV2 has not"):
        LayerLatencyCost(table).total(STOCK['mobilenet-v2']())
    # the same layers, wider than measured
    table = synthetic_table(MobileNetV2(widen_factor=0.5))
    with pytest.raises(ValueError, match=r"table: layer 'conv1.conv' was "
                       r"measured as .*'out_channels': 16.*the model has .*"
                       r"'out_channels': 32"):
        width_cost_of(MobileNetV2(widen_factor=1.0), latency_cost(table))
    # a layer of a unit the table has no entry for
    table['layers'] = [e for e in table['layers']
                       if e['name'] != 'layer2.0.conv.0.conv']
    with pytest.raises(ValueError, match=r"has no layer "
                       r"'layer2.0.conv.0.conv', whose channels are a "
                       r"unit's"):
        width_cost_of(STOCK['mobilenet-v2'](), latency_cost(table))


def test_a_fixed_axis_asked_at_another_width_is_refused():
    table = toy_table()
    cost = LayerLatencyCost(table)
    net = toy()
    positions = cost.layer_positions(net)
    with pytest.raises(ValueError, match=r"layer '0' was measured at 3 input "
                       r"channels only .* asked for 2"):
        cost.layer_cost(net[0], 2, 8, 1, positions[net[0]])
    net[0] = nn.Conv2d(2, 8, 3, padding=1)
    with pytest.raises(ValueError, match=r"table: layer '0' was measured as"):
        cost.total(net)


@pytest.mark.parametrize('edit,match', [
    (lambda t: t['layers'][1]['ms'][0].__setitem__(1, -1.0),
     r"layers\[1\] \(3\)\.ms\[0\]\[1\] = -1.0: a latency cannot be negative"),
    (lambda t: t['layers'][1]['ms'][2].__setitem__(0, float('nan')),
     r"layers\[1\] \(3\)\.ms\[2\]\[0\] = nan: a latency must be finite"),
    (lambda t: t.pop('fixed_ms'), r'fixed_ms = None: a latency must be'),
    (lambda t: t['layers'][0].__setitem__('out_widths', [2, 4, 6]),
     r"layers\[0\] \(0\)\.out_widths = \[2, 4, 6\]: must end at "
     r"out_channels \(8\)"),
    (lambda t: t['layers'][0].__setitem__('out_widths', [4, 2, 8]),
     r'out_widths = \[4, 2, 8\]: must be increasing positive integers'),
    (lambda t: t['layers'][1].__setitem__('ms', [[1.0, 2.0]]),
     r"layers\[1\] \(3\)\.ms = .*must be 3 rows \(input widths\) of 2"),
    (lambda t: t['layers'][1].__setitem__('name', '0'),
     r"layers\[1\]\.name = '0': must be the layer's module path"),
    (lambda t: t['layers'][0].__setitem__('type', 'Conv3d'),
     r"layers\[0\] \(0\)\.type = 'Conv3d': must be 'Conv2d' or 'Linear'"),
    (lambda t: t.__setitem__('runtime', 'tvm'), r"runtime = 'tvm': must be"),
    (lambda t: t.__setitem__('version', 7), r'table: version 7 in the table '
     r'given as a dict, expected 1'),
], ids=['negative', 'nan', 'no-fixed', 'short-widths', 'unsorted-widths',
        'grid-shape', 'duplicate-name', 'type', 'runtime', 'version'])
def test_bad_tables_are_refused_naming_the_field(edit, match):
    table = toy_table()
    edit(table)
    with pytest.raises(ValueError, match=match):
        LayerLatencyCost(table)


def test_the_kinds_of_table_and_cost_model_meet(tmp_path):
    layers = synthetic_table(STOCK['mobilenet-v2']())
    path = tmp_path / 'layers.json'
    path.write_text(json.dumps(layers))
    assert isinstance(latency_cost(str(path)), LayerLatencyCost)
    with pytest.raises(ValueError, match=rf'table: {path} is a per-layer '
                       'table .*its cost model is LayerLatencyCost'):
        LatencyCost(str(path))
    blocks = dict(version=2, stem_ms=0.1, head_ms=0.1, blocks=[])
    assert isinstance(latency_cost(blocks), LatencyCost)
    with pytest.raises(ValueError, match='is not a per-layer table'):
        LayerLatencyCost(blocks)
    # a per-block table cannot cost a stock model's units ...
    with pytest.raises(SearchRefused, match=r'LatencyCost: costs AtomNAS '
                       r'blocks only; layer1.0.conv.0.bn and the other units '
                       r'.* or to a latency target with a per-layer table'):
        from atomnas_mm.search.costs import width_cost
        model = STOCK['mobilenet-v2']()
        width_cost(model, LatencyCost(blocks), find_units(model), 1.0)
    # ... nor a per-layer one an AtomNAS supernet's blocks
    net = AtomNAS(arch=SUPERNET)
    with pytest.raises(SearchRefused, match=r'LayerLatencyCost: costs the '
                       r'layers of channel units only \(the table given as '
                       r'a dict is a per-layer table\); the AtomNAS blocks '
                       r'of AtomNAS need a per-block latency table'):
        width_cost(net, latency_cost(layers), find_units(net), 1.0)


def test_measured_table_loads_and_predicts_the_full_model():
    """A tiny measurement: every unit layer is in the table with its input
    size in the model, and the table predicts the full model as measured
    (the fit passes through it)."""
    torch.manual_seed(0)
    model = ResNet(18, base_channels=4, stem_channels=4, num_stages=2,
                   strides=(1, 2), dilations=(1, 1), out_indices=(1, ))
    table = measure_layer_table(model, (1, 3, 16, 16), samples=1,
                                min_run_time=0.001, progress=False,
                                repeats=1, calibrate=1)
    cost = latency_cost(json.loads(json.dumps(table)))
    names = {e['name']: e for e in table['layers']}
    assert names['layer1.0.conv1']['input_size'] == [4, 4]
    assert names['layer2.0.conv2']['input_size'] == [2, 2]
    assert names['layer1.0.conv2']['in_widths'] == [1, 2, 4]
    assert cost.total(model) == pytest.approx(table['model_ms'], rel=1e-6)
    narrow = copy.deepcopy(model)
    narrow_to_widths(narrow, {'layer1.0.bn1': [2]})
    assert cost.total(narrow) <= cost.total(model)


# -- the tool and a search through tools/train.py -----------------------------
@pytest.mark.slow
def test_tool_measures_a_stock_model_s_table_and_predicts(tmp_path):
    out = tmp_path / 'table.json'
    run = subprocess.run(
        [sys.executable, TOOL, MBV2_DEMO, '--out', str(out), '--samples', '1',
         '--min-run-time', '0.002', '--threads', '1', '--predict',
         '--subnets', '1'], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    table = json.loads(out.read_text())
    assert table['kind'] == 'layers' and table['input_shape'] == \
        [1, 3, 28, 28]
    model = _demo_model()
    # every conv of the units
    assert len(table['layers']) == len(unit_layers(model, find_units(model)))
    assert LayerLatencyCost(str(out)).total(
        search_root(model)) == pytest.approx(table['model_ms'])
    lines = [line for line in run.stdout.splitlines()
             if line.startswith(('full model', 'random sub-net'))]
    assert len(lines) == 2 and all('%' in line for line in lines)


def _demo_model():
    from mmengine.config import Config
    from mmpretrain.registry import MODELS
    return MODELS.build(Config.fromfile(MBV2_DEMO).model)


@pytest.mark.slow
@pytest.mark.skipif(not osp.isdir('/usr/share/datasets/fashion-mnist'),
                    reason='needs the Debian package dataset-fashion-mnist '
                    '(tools/install.sh installs it when apt is available)')
def test_latency_target_search_of_the_mobilenet_v2_demo(tmp_path):
    """tools/train.py on the MobileNetV2 demo (shortened) with a latency
    target in the middle of the reachable range by a measured per-layer
    table (at 28 px most of a layer's time is fixed: a net of one channel
    per unit keeps most of it), set from the command line: the searched
    widths land within the tolerance of the target by the table."""
    model = _demo_model()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table = measure_layer_table(model, (1, 3, 28, 28), samples=1,
                                    min_run_time=0.002, progress=False,
                                    repeats=1, calibrate=1)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path / 'latency.json'
    path.write_text(json.dumps(table))
    cost = LayerLatencyCost(str(path))
    low = width_cost_of(model, cost).smallest()
    target = (low + cost.total(search_root(model))) / 2
    work = tmp_path / 'work'
    cmd = demo_cmd(work, tmp_path / 'data', iters_per_epoch=8,
                   config=MBV2_DEMO, options=(
                       'custom_hooks.2.target._delete_=True',
                       f'custom_hooks.2.target.latency_ms={target}',
                       f'custom_hooks.2.latency_table={path}',
                       'custom_hooks.2.interval=2',
                       'custom_hooks.3.num_batches=1'))
    out = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    meta = torch.load(work / 'epoch_2.pth', weights_only=True)['meta']
    searched = _demo_model()
    narrow_to_widths(searched, meta['channel_units'])
    assert target <= cost.total(search_root(searched)) <= 1.02 * target
