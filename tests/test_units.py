"""Channel units of stock models: finding, surgery, costs, penalty, refusals
(atomnas_mm.search.units / finders)."""
import copy
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmpretrain.models import (EfficientNet, MobileNetV2, MobileNetV3, ResNet,
                               ResNeXt)

import atomnas_mm  # noqa: F401
from atomnas_mm.models import AtomNAS
from atomnas_mm.search import bn_l1_penalty, shrink_optimizer
from atomnas_mm.search.costs import FLOPsCost, ParamsCost
from atomnas_mm.search.penalty import proximal_l1_step
from atomnas_mm.search.shrink import (apply_plan, backbone_cost,
                                      channel_widths, narrow_to_widths,
                                      plan_shrink, shrink_model,
                                      width_cost_of)
from atomnas_mm.search.units import (AtomUnit, SearchRefused, find_units,
                                     require_units)
from harness import (ROOT, SUPERNET, calibrated, exact_shrink_logits,
                     kill_every_other, remove_at_random)


def randomised(model, seed=0):
    """Random BN affine and running statistics (folding is then visible)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + .5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(torch.randn(m.running_mean.shape,
                                                 generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape,
                                               generator=gen) + .5)
    model.eval()
    return model


def mbv2_classifier(widen_factor=0.5, **backbone):
    """A MobileNetV2 classifier (GAP, LinearClsHead), the same weights on
    every call."""
    from mmpretrain.models import ImageClassifier
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ImageClassifier(
            backbone=dict(type='MobileNetV2', widen_factor=widen_factor,
                          **backbone),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=3, in_channels=1280))


STOCK = {
    'mobilenet-v2': lambda: MobileNetV2(widen_factor=0.5),
    'mobilenet-v3': lambda: MobileNetV3('small'),  # SE, HSwish
    'efficientnet': lambda: EfficientNet('b0'),  # SE, Swish
    'resnet-18': lambda: ResNet(18, base_channels=16, stem_channels=16),
    'resnet-50': lambda: ResNet(50, base_channels=16, stem_channels=16),
}


def test_finders_name_units_by_their_gate_and_skip_what_they_cannot_prove():
    skipped = []
    units = find_units(MobileNetV2(widen_factor=0.5), skipped=skipped)
    # 16 expanding blocks' hidden channels, the stem, 7 residual streams
    assert len(units) == 24 and list(units)[:3] == [
        'layer1.0.conv.0.bn', 'layer1.0.conv.1.bn', 'layer2.0.conv.1.bn']
    assert skipped == [('conv2', "the last conv's outputs leave the backbone "
                        'to a reader other than global average pooling and '
                        'a LinearClsHead: not searched')]
    units = find_units(ResNet(50, base_channels=16, frozen_stages=1))
    assert list(units)[:2] == ['layer2.0.bn1', 'layer2.0.bn2']
    # layer1 and the stem frozen; the inner channels of 13 blocks and the
    # streams of layer2 and layer3 (layer4's leaves the bare backbone)
    assert len(units) == 2 * (4 + 6 + 3) + 2
    assert all(not isinstance(u, AtomUnit) for u in units.values())
    assert all(isinstance(u, AtomUnit)
               for u in find_units(AtomNAS(arch=SUPERNET)).values())


def test_a_model_without_units_is_refused_naming_what_was_seen():
    with pytest.raises(SearchRefused, match=r'search: the model has no '
                       r'searchable channel unit:\n  layer1.0: grouped conv'):
        # its streams would be units: every stage is an output here
        require_units(ResNeXt(50, base_channels=16, out_indices=(0, 1, 2, 3)))
    with pytest.raises(SearchRefused, match='no BN-gated channels that a '
                       'finder knows'):
        require_units(nn.Sequential(nn.Conv2d(3, 8, 3), nn.LayerNorm(8)))


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=pytest.mark.slow) if n == 'efficientnet' else n
    for n in sorted(STOCK)])
def test_removal_matches_the_masked_model_within_its_bound(name):
    """Every unit's removal changes its consumer's BN output by at most the
    bound it states (0: exactly nothing), with random BN statistics."""
    model = randomised(STOCK[name]())
    units = find_units(model)
    plan = kill_every_other(units)
    x = torch.randn(2, 3, 32, 32)
    for unit_name, unit in units.items():
        consumer_bn = next(fold for _, fold in unit.consumers
                           if isinstance(fold, nn.BatchNorm2d))
        seen = []
        handle = consumer_bn.register_forward_hook(
            lambda m, i, o: seen.append(o.detach().clone()))
        with torch.no_grad():
            model(x)
            bound = unit.error_bound(plan[unit_name])
            unit.remove(plan[unit_name])
            model(x)
        handle.remove()
        assert unit.num_channels == len(plan[unit_name])
        change = (seen[0] - seen[1]).abs().max().item()
        assert change <= bound + 1e-4, (unit_name, change, bound)
        if bound == 0:
            assert change < 1e-4
    assert any(u.error_bound(torch.arange(u.num_channels)) == 0
               for u in units.values())


@pytest.mark.parametrize('name', sorted(STOCK))
@pytest.mark.parametrize('cost', [FLOPsCost(64), ParamsCost()],
                         ids=['flops', 'params'])
def test_width_cost_predicts_the_shrunk_model(name, cost):
    model = STOCK[name]()
    widths = width_cost_of(model, cost)
    assert widths.total == backbone_cost(model, cost)
    plan = remove_at_random(widths)
    low = widths.smallest()
    apply_plan(model, plan)
    assert backbone_cost(model, cost) == widths.total
    assert low < widths.total


def test_optimizer_and_ema_follow_a_unit_surgery():
    model = STOCK['resnet-50']()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32))[-1].sum().backward()
    opt.step()
    unit = find_units(model)['layer2.0.bn2']
    conv3 = model.layer2[0].conv3
    momentum = opt.state[conv3.weight]['momentum_buffer'].clone()
    keep = torch.tensor([0, 2, 5])
    remap = apply_plan(model, {'layer2.0.bn2': keep})
    apply_plan(ema, {'layer2.0.bn2': keep})  # frozen copies follow too
    shrink_optimizer(opt, model, remap)
    assert unit.num_channels == 3 and conv3.in_channels == 3
    assert torch.equal(opt.state[conv3.weight]['momentum_buffer'],
                       momentum[:, keep])
    assert ema.layer2[0].conv3.weight.shape == conv3.weight.shape
    opt.step()  # the optimizer holds the new tensors


def test_penalty_and_proximal_step_over_units():
    model = STOCK['mobilenet-v2']()
    units = find_units(model)
    weights = {name: float(i + 1) for i, name in enumerate(units)}
    expected = sum(weights[n] * u.gammas().abs().sum()
                   for n, u in units.items())
    assert torch.allclose(bn_l1_penalty(model, weights), expected)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    proximal_l1_step(model, opt, rho=1.0, weights=weights)
    first, last = list(units.values())[0], list(units.values())[-1]
    # 1 - lr * rho * weight, but the strongest channel (min_width 1) stays
    for unit, shrunk in ((first, 0.5), (last, 0.0)):
        values = unit.gate.weight.tolist()
        assert sorted(values) == [shrunk] * (len(values) - 1) + [1.0]
    other = model.conv1.bn.weight  # not a unit's gate: untouched
    assert torch.all(other == 1)
    # a residual stream: every writer's scales shrink, the same channel stays
    stream = units['layer3.0.conv.2.bn']
    shrunk = max(0.0, 1 - 0.5 * weights['layer3.0.conv.2.bn'])
    kept = {int(torch.argmax(gate.weight)) for gate in stream.gates}
    assert len(stream.gates) == 3 and len(kept) == 1
    for gate in stream.gates:
        assert sorted(gate.weight.tolist()) == \
            [shrunk] * (stream.num_channels - 1) + [1.0]


def test_shrink_model_and_reloading_by_widths():
    """shrink_model on a stock net, then a fresh net narrowed to the stored
    widths takes the shrunk state dict strictly and gives the same output."""
    model = randomised(STOCK['resnet-50']())
    units = find_units(model)
    plan = kill_every_other(units)
    dead = sum(u.num_channels - len(plan[n]) for n, u in units.items())
    with pytest.warns(UserWarning, match='not folded exactly'):
        result = shrink_model(model, threshold=0.0)
    assert result['removed_atoms'] == dead and result['error_bound'] > 0
    widths = channel_widths(model)
    assert widths == result['widths']
    fresh = STOCK['resnet-50']()
    fresh.eval()
    narrow_to_widths(fresh, widths)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(fresh(x)[-1], model(x)[-1])
    with pytest.raises(ValueError, match="channel_units: the model has no "
                       "channel unit 'nope'"):
        narrow_to_widths(fresh, {'nope': [3]})
    assert plan_shrink(fresh) == {}  # nothing dead is left


def test_a_cost_without_layer_costs_is_refused_for_channel_units():
    """Latency tables describe AtomNAS blocks: a stock model's units cannot
    be costed by them, and the error names the first unit."""
    class TableCost:
        def total(self, backbone):
            return 1.0

    with pytest.raises(SearchRefused, match=r'TableCost: costs AtomNAS '
                       r'blocks only; layer1.0.conv.0.bn and the other'):
        width_cost_of(STOCK['mobilenet-v2'](), TableCost())


def test_get_model_narrows_a_stock_model_to_a_searched_checkpoint(tmp_path):
    """mmpretrain's get_model(config, pretrained=ckpt) with the unedited
    config of a stock model: the units narrow to the checkpoint's widths
    while it loads (no hook involved)."""
    from mmpretrain import get_model
    cfg = tmp_path / 'mbv2.py'
    cfg.write_text(
        "model = dict(type='ImageClassifier', backbone=dict("
        "type='MobileNetV2', widen_factor=0.5), neck=dict("
        "type='GlobalAveragePooling'), head=dict(type='LinearClsHead', "
        "num_classes=3, in_channels=1280))\n")
    model = get_model(str(cfg))
    units = find_units(model)
    randomised(model.backbone)
    plan = kill_every_other(units)
    apply_plan(model, plan)
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(channel_units=channel_widths(model))),
               tmp_path / 'searched.pth')
    loaded = get_model(str(cfg), pretrained=str(tmp_path / 'searched.pth'))
    assert channel_widths(loaded) == channel_widths(model)
    model.eval()
    loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_mobilenet_v2_classifier_units_and_refusals():
    """In a classifier (GAP + LinearClsHead) the last conv is a unit read by
    the fc; streams read at several points say how many writers each reader
    sums; a stream that leaves the backbone (a neck reads a stage: FPN) or
    a frozen stem is named, not searched."""
    units = find_units(mbv2_classifier())
    residual = {n: u for n, u in units.items() if u.kind == 'residual'}
    assert list(residual) == [
        'backbone.layer1.0.conv.1.bn', 'backbone.layer2.0.conv.2.bn',
        'backbone.layer3.0.conv.2.bn', 'backbone.layer4.0.conv.2.bn',
        'backbone.layer5.0.conv.2.bn', 'backbone.layer6.0.conv.2.bn',
        'backbone.layer7.0.conv.2.bn']
    assert [len(u.gates) for u in residual.values()] == [1, 2, 3, 4, 3, 3, 1]
    # layer3's stream: read by blocks 1 and 2, then by layer4.0
    assert residual['backbone.layer3.0.conv.2.bn'].reads == [1, 2, 3]
    last = units['backbone.conv2.bn']
    assert last.consumers == [(last.consumers[0][0], 'bias')] and \
        isinstance(last.consumers[0][0], nn.Linear)
    assert len(units) == 16 + 1 + 7 + 1
    skipped = []
    backbone = MobileNetV2(widen_factor=0.5, out_indices=(2, 7),
                           frozen_stages=0)
    backbone.train()  # freezes
    units = find_units(backbone, skipped=skipped)
    assert ('layer3.0', 'its stream is an output of the backbone '
            '(out_indices 2): not searched') in skipped
    assert ('layer1.0.conv.0.bn', 'frozen (requires_grad=False): not '
            'searched') in skipped
    assert 'layer3.0.conv.2.bn' not in units and \
        'layer4.0.conv.2.bn' in units


def test_removing_dead_stream_stem_and_last_conv_channels_is_exact():
    """Channels dead in every writer of a stream (and in the stem's and the
    last conv's gates) are removed with the classifier's eval logits
    unchanged; a channel alive in one writer is not dead: removing it
    changes them (the joint gate is needed)."""
    model = calibrated(mbv2_classifier())
    units = find_units(model)
    plan = kill_every_other(units)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before, after = exact_shrink_logits(model, units, plan, x)
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-4), \
        (before - after).abs().max()
    assert model.head.fc.in_features == 640 and \
        model.backbone.layer3[1].conv[0].conv.in_channels == 8

    model = calibrated(mbv2_classifier())
    stream = find_units(model)['backbone.layer3.0.conv.2.bn']
    with torch.no_grad():
        stream.gates[0].weight[0] = 0  # dead in the first writer only
        before = model(x, mode='tensor')
        stream.remove(torch.arange(1, stream.num_channels))
        assert (model(x, mode='tensor') - before).abs().max() > 1e-3


@pytest.mark.parametrize('combine', ['max', 'sum', 'l2'])
def test_a_stream_channel_is_as_strong_as_its_writers_combined(combine):
    from atomnas_mm.search.finders import MobileNetV2StreamFinder
    model = MobileNetV2(widen_factor=0.5)
    finder = [MobileNetV2StreamFinder(stem=False, last_conv=False,
                                      combine=combine)]
    stream = find_units(model, finder)['layer3.0.conv.2.bn']
    with torch.no_grad():
        for i, gate in enumerate(stream.gates):
            gate.weight.fill_(0)
            gate.weight[i] = -(i + 1.0)  # channel i alive in writer i only
    strength = stream.gammas()
    expected = {'max': [1., 2., 3.], 'sum': [1., 2., 3.],
                'l2': [1., 2., 3.]}[combine]
    assert strength[:3].tolist() == expected and not strength[3:].any()
    with torch.no_grad():
        for gate in stream.gates:
            gate.weight[3] = 2.0
    assert float(stream.gammas()[3].detach()) == pytest.approx({
        'max': 2.0, 'sum': 6.0, 'l2': 12 ** .5}[combine])
    with pytest.raises(ValueError, match="combine: one of"):
        MobileNetV2StreamFinder(combine='mean')


def test_width_cost_of_a_classifier_counts_the_backbone_only():
    """The last conv's reader (the head's fc) is outside the counted
    backbone: not costed, not refused; the prediction matches a count."""
    model = mbv2_classifier()
    cost = FLOPsCost(32)
    widths = width_cost_of(model, cost)
    assert widths.total == backbone_cost(model, cost)
    plan = {}
    for name, unit in widths.units.items():
        keep = max(1, unit.num_channels // 3)
        widths.remove(name, 0, unit.num_channels - keep)
        plan[name] = torch.arange(keep)
    apply_plan(model, plan)
    assert backbone_cost(model, cost) == widths.total
    assert widths.smallest() < 0.01 * backbone_cost(mbv2_classifier(), cost)


def test_export_narrows_the_whole_classifier_when_the_last_conv_shrank(
        tmp_path):
    """The last conv's reader is the head's fc: the exported config narrows
    the whole model (``atomnas_mm.Narrowed`` around the classifier), which
    builds with the Runner's data_preprocessor and loads the weights
    strictly."""
    from mmengine.config import Config
    from mmpretrain.registry import MODELS

    from atomnas_mm.export import export_channels
    config = 'configs/demo/mobilenet-v2_fashion_mnist_search.py'
    cfg = Config.fromfile(osp.join(ROOT, config))
    model = MODELS.build(cfg.model)
    apply_plan(model, {'backbone.conv2.bn': torch.arange(640),
                       'backbone.layer7.0.conv.2.bn': torch.arange(100)})
    ckpt = dict(state_dict=model.state_dict(),
                meta=dict(channel_units=channel_widths(model)))
    paths = export_channels(ckpt, str(tmp_path / 'epoch_1.pth'),
                            str(tmp_path / 'export'), name='m',
                            config=osp.join(ROOT, config))
    exported = Config.fromfile(paths['config']).model
    assert exported.type == 'atomnas_mm.Narrowed' and \
        exported.model.type == 'ImageClassifier'
    exported.data_preprocessor = dict(type='ClsDataPreprocessor')
    built = MODELS.build(exported)
    built.load_state_dict(torch.load(paths['checkpoint'],
                                     weights_only=True)['state_dict'])
    assert built.head.fc.in_features == 640


def test_a_stage_starting_with_a_residual_block_continues_the_stream():
    """A stage whose first block keeps width and stride adds into the
    previous stage's stream: one unit over both, removal exact."""
    arch = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 24, 2, 1], [6, 32, 1, 2]]
    net = type('MobileNetV2', (MobileNetV2, ), dict(arch_settings=arch))(
        out_indices=(4, ))
    units = find_units(net)
    stream = units['layer2.0.conv.2.bn']
    assert len(stream.gates) == 4 and stream.reads == [1, 2, 3, 4]
    assert 'layer3.0.conv.2.bn' not in units
    calibrated(net)
    plan = kill_every_other({'layer2.0.conv.2.bn': stream})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = net(x)[-1]
        assert (before[0] - before[1]).abs().max() > 0.1
        apply_plan(net, plan)
        assert torch.allclose(net(x)[-1], before, rtol=1e-4, atol=1e-4)
    assert net.layer3[1].conv[0].conv.in_channels == 12
