"""ResNet's stage channels as units (issue 18): each stage's residual stream
(its writers' BNs gating it jointly, ReLU after every addition) and the stem
(atomnas_mm.search.finders.ResNetStreamFinder)."""
import copy
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmpretrain.models import ImageClassifier, ResNet

import atomnas_mm  # noqa: F401
from atomnas_mm.search import shrink_optimizer
from atomnas_mm.search.costs import FLOPsCost, ParamsCost
from atomnas_mm.search.shrink import (apply_plan, backbone_cost,
                                      channel_widths, plan_shrink,
                                      width_cost_of)
from atomnas_mm.search.units import ResidualUnit, find_units
from harness import (ROOT, calibrated, exact_shrink_logits, kill_every_other,
                     remove_at_random)


def small(depth, **backbone):
    return ResNet(depth, base_channels=16, stem_channels=16, **backbone)


def classifier(depth=50, backbone='ResNet', **kwargs):
    """A small ResNet classifier (GAP, LinearClsHead), the same weights on
    every call."""
    kwargs = dict(dict(base_channels=16, stem_channels=16), **kwargs)
    channels = 128 * (1 if depth < 50 else 4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ImageClassifier(
            backbone=dict(type=backbone, depth=depth, **kwargs),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=3,
                      in_channels=channels))


def streams(units):
    return {n: u for n, u in units.items() if u.kind == 'residual'}


def stage_units(units):
    """The stream and stem units (not the blocks' inner channels)."""
    return {n: u for n, u in units.items()
            if u.kind == 'residual' or 'layer' not in n}


INPUT = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('make,names,gates', [
    (lambda: small(18), ['layer1.0.bn2', 'layer2.0.bn2', 'layer3.0.bn2'],
     [3, 3, 3]),
    (lambda: small(50), ['bn1', 'layer1.0.bn3', 'layer2.0.bn3',
                         'layer3.0.bn3'], [4, 5, 7]),
    (lambda: small(50, frozen_stages=1), ['layer2.0.bn3', 'layer3.0.bn3'],
     [5, 7]),
    (lambda: small(18, deep_stem=True),
     ['layer1.0.bn2', 'layer2.0.bn2', 'layer3.0.bn2'], [3, 3, 3]),
    (lambda: small(50, deep_stem=True, avg_down=True),
     ['stem.2.bn', 'layer1.0.bn3', 'layer2.0.bn3', 'layer3.0.bn3'],
     [4, 5, 7])],
    ids=['r18', 'r50', 'r50-frozen1', 'r18-deep-stem', 'r50-v1d'])
def test_streams_and_stem_of_a_bare_backbone(make, names, gates):
    """Stages 1-3 of a bare backbone are streams (stage 4's output leaves
    it, to an unknown reader); ResNet-50's stem is its own unit (its first
    block has a downsample), ResNet-18's writes the first stream."""
    net = make()
    net.train()  # freezes frozen_stages
    skipped = []
    units = find_units(net, skipped=skipped)
    assert list(stage_units(units)) == names
    assert [len(u.gates) for u in streams(units).values()] == gates
    inner = 8 if net.depth == 18 else 2 * 16
    if net.frozen_stages == 1:
        inner -= 2 * 3
    assert len(units) == inner + len(names)
    last = f'layer4.0.bn{2 if net.depth == 18 else 3}'
    assert (last, 'its stream is an output of the backbone (out_indices 3), '
            'read outside it: not searched') in skipped
    if net.frozen_stages == 1:
        for name in ('bn1', 'layer1.0.bn3'):
            assert (name, 'frozen (requires_grad=False): not searched') in \
                skipped


def test_stream_writers_and_readers_in_a_classifier():
    """ResNet-18: the stem writes stage 1; each stage's stream is read by
    its blocks' conv1, the next stage's conv1 and downsample, and stage 4's
    by the fc through the neck's global pooling (its bias takes the
    constant)."""
    model = classifier(18)
    units = streams(find_units(model))
    assert list(units) == [f'backbone.layer{i}.0.bn2' for i in range(1, 5)]
    first = units['backbone.layer1.0.bn2']
    net = model.backbone
    assert first.gates == [net.norm1, net.layer1[0].norm2,
                           net.layer1[1].norm2]
    assert first.reads == [1, 2, 3, 3]
    assert [layer for layer, _ in first.consumers] == [
        net.layer1[0].conv1, net.layer1[1].conv1, net.layer2[0].conv1,
        net.layer2[0].downsample[0]]
    second = units['backbone.layer2.0.bn2']
    assert second.gates == [net.layer2[0].norm2, net.layer2[0].downsample[1],
                            net.layer2[1].norm2]
    assert second.post_acts[0] is None and second.reads == [2, 3, 3]
    last = units['backbone.layer4.0.bn2']
    assert last.consumers[-1] == (model.head.fc, 'bias')


def test_detector_style_backbones_list_their_streams_as_skipped():
    """Every stage an output (FPN reads them): no stream is searched, each
    named with the reason; a classifier reading stages 3 and 4 searches
    stage 4 only."""
    skipped = []
    units = find_units(small(50, out_indices=(0, 1, 2, 3)), skipped=skipped)
    assert not streams(units) and 'bn1' in units
    for i in range(4):
        assert (f'layer{i + 1}.0.bn3', f'its stream is an output of the '
                f'backbone (out_indices {i}), read outside it: not '
                'searched') in skipped
    mmdet = pytest.importorskip('mmdet.models.backbones')
    net = mmdet.ResNet(50, base_channels=16, stem_channels=16,
                       out_indices=(0, 1, 2, 3), frozen_stages=1,
                       norm_eval=True)
    net.train()
    skipped = []
    units = find_units(net, skipped=skipped)
    assert not streams(units) and 'bn1' not in units
    assert [n for n, why in skipped if 'output of the backbone' in why] == [
        f'layer{i}.0.bn3' for i in range(1, 5)]
    skipped = []
    units = find_units(classifier(50, out_indices=(2, 3)), skipped=skipped)
    assert list(streams(units)) == ['backbone.layer1.0.bn3',
                                    'backbone.layer2.0.bn3',
                                    'backbone.layer4.0.bn3']
    assert ('backbone.layer3.0.bn3', 'its stream is an output of the '
            'backbone (out_indices 2), read outside it: not searched') in \
        skipped


@pytest.mark.parametrize('make', [
    lambda: classifier(50),
    lambda: classifier(50, deep_stem=True, avg_down=True),
    lambda: classifier(50, backbone='ResNeXt', groups=4, width_per_group=4),
    lambda: classifier(50, norm_eval=True)],
    ids=['r50', 'r50-v1d', 'resnext50', 'r50-norm-eval'])
def test_removing_channels_dead_in_every_writer_is_exact(make):
    """Bottleneck streams and the stem: every reader is 1x1 or the fc, the
    constant of a dead channel (the writers' shifts through the additions
    and ReLUs) folds exactly: the classifier's eval logits do not change
    (with ``norm_eval`` its training-mode outputs neither: the folds go to
    the running statistics its BNs use). A ResNeXt's streams are units too
    (its grouped conv2 is not)."""
    model = make()
    norm_eval, model.backbone.norm_eval = model.backbone.norm_eval, False
    model = calibrated(model).double()  # BN statistics of a few batches
    model.backbone.norm_eval = norm_eval
    model.train(norm_eval)
    units = stage_units(find_units(model))
    assert len(units) == 5
    plan = kill_every_other(units)
    x = INPUT.double()
    before, after = exact_shrink_logits(model, units, plan, x)
    assert (before - after).abs().max() < 1e-9
    assert model.head.fc.in_features == 256


def test_basic_block_readers_stay_within_the_bound():
    """ResNet-18's streams are read by padded 3x3 convs: at each reader the
    removed channels are the constant the unit computes (exactly), and the
    reader's BN output moves by at most the stated bound."""
    model = calibrated(classifier(18)).double()
    units = streams(find_units(model))
    plan = kill_every_other(units)
    x = INPUT.double()
    bounds = []
    for name, unit in units.items():
        keep = plan[name]
        removed = torch.ones(unit.num_channels, dtype=torch.bool)
        removed[keep] = False
        seen = {}
        hooks = [layer.register_forward_pre_hook(
            lambda m, args, i=i: seen.setdefault(i, args[0].detach()))
            for i, (layer, _) in enumerate(unit.consumers)]
        with torch.no_grad():
            model(x, mode='tensor')
        for hook in hooks:
            hook.remove()

        def outputs(inputs):
            with torch.no_grad():
                return [fold(layer(inputs[i])) if isinstance(fold, nn.Module)
                        else layer(inputs[i])
                        for i, (layer, fold) in enumerate(unit.consumers)]

        for i, const in enumerate(unit.consumer_constants()):
            value = seen[i][:, removed]
            shape = (1, -1) + (1, ) * (value.dim() - 2)
            assert torch.allclose(value, const[removed].view(shape).expand_as(
                value), atol=1e-9), (name, i)
        before = outputs(seen)
        bound = unit.error_bound(keep)
        unit.remove(keep)
        after = outputs({i: v[:, keep] for i, v in seen.items()})
        for i, (old, new) in enumerate(zip(before, after)):
            change = (old - new).abs().max().item()
            assert change <= bound + 1e-9, (name, i, change, bound)
            if isinstance(unit.consumers[i][0], nn.Linear):
                assert change < 1e-9  # the fc's bias takes it exactly
        bounds.append(bound)
    assert all(b > 0 for b in bounds)


def test_a_channel_alive_in_one_writer_is_not_dead():
    model = calibrated(classifier(50)).double()
    stream = find_units(model)['backbone.layer2.0.bn3']
    with torch.no_grad():
        for gate in stream.gates:
            gate.weight[0] = 0
        stream.gates[1].weight[0] = 1  # the downsample's
        before = model(INPUT.double(), mode='tensor')
        stream.remove(torch.arange(1, stream.num_channels))
        assert (model(INPUT.double(), mode='tensor') - before).abs().max() \
            > 1e-3


@pytest.mark.parametrize('make', [lambda: small(18), lambda: small(50),
                                  lambda: classifier(18)],
                         ids=['r18', 'r50', 'r18-classifier'])
@pytest.mark.parametrize('cost', [FLOPsCost(32), ParamsCost()],
                         ids=['flops', 'params'])
def test_width_cost_of_the_stage_units_predicts_the_shrunk_model(make, cost):
    """Convs between a stream and an inner unit (conv1, the last conv) cost
    the product of both widths; a downsample the product of two streams."""
    model = make()
    widths = width_cost_of(model, cost)
    assert widths.total == backbone_cost(model, cost)
    assert stage_units(widths.units)
    plan = remove_at_random(widths, seed=2)
    apply_plan(model, plan)
    assert backbone_cost(model, cost) == widths.total


def test_optimizer_and_ema_follow_a_stream_surgery():
    model = small(50)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32))[-1].sum().backward()
    opt.step()
    name = 'layer2.0.bn3'
    writer = model.layer2[0].downsample[0].weight
    reader = model.layer3[0].conv1.weight
    gate = model.layer2[1].norm3.weight
    state = {p: opt.state[p]['momentum_buffer'].clone()
             for p in (writer, reader, gate)}
    keep = torch.tensor([0, 2, 5, 40])
    remap = apply_plan(model, {name: keep})
    apply_plan(ema, {name: keep})  # frozen copies follow too
    shrink_optimizer(opt, model, remap)
    layer2, layer3 = model.layer2, model.layer3
    assert layer2[0].downsample[0].out_channels == 4 and \
        layer2[1].conv1.in_channels == 4 and layer3[0].conv1.in_channels == 4
    assert torch.equal(opt.state[layer2[0].downsample[0].weight][
        'momentum_buffer'], state[writer][keep])
    assert torch.equal(opt.state[layer3[0].conv1.weight]['momentum_buffer'],
                       state[reader][:, keep])
    assert torch.equal(opt.state[layer2[1].norm3.weight]['momentum_buffer'],
                       state[gate][keep])
    assert {k: v.shape for k, v in ema.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}
    model(torch.randn(2, 3, 32, 32))[-1].sum().backward()
    opt.step()  # the optimizer holds the new tensors


def test_round_to_keeps_stream_widths_aligned():
    model = classifier(18)
    stream = find_units(model)['backbone.layer3.0.bn2']
    with torch.no_grad():
        for gate in stream.gates:
            gate.weight[:13] = 0
    plan = plan_shrink(model, round_to=8)
    assert len(plan['backbone.layer3.0.bn2']) == 56


def test_a_searched_checkpoint_narrows_the_unedited_config(tmp_path):
    """get_model(config, pretrained=ckpt): the streams narrow to the
    checkpoint's widths (meta['channel_units']) while it loads."""
    from mmpretrain import get_model
    cfg = tmp_path / 'r18.py'
    cfg.write_text(
        "model = dict(type='ImageClassifier', backbone=dict(type='ResNet', "
        "depth=18, base_channels=16, stem_channels=16), neck=dict("
        "type='GlobalAveragePooling'), head=dict(type='LinearClsHead', "
        "num_classes=3, in_channels=128))\n")
    model = calibrated(get_model(str(cfg)))
    apply_plan(model, kill_every_other(streams(find_units(model))))
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(channel_units=channel_widths(model))),
               tmp_path / 'searched.pth')
    loaded = get_model(str(cfg), pretrained=str(tmp_path / 'searched.pth'))
    assert channel_widths(loaded) == channel_widths(model)
    assert loaded.backbone.layer2[0].conv1.in_channels == 8
    loaded.eval()
    assert torch.equal(loaded(INPUT), model(INPUT))


def test_export_narrows_the_whole_classifier_when_stage_4_shrank(tmp_path):
    """Stage 4's stream is read by the head's fc: the export of the demo
    search narrows the whole model and loads strictly."""
    from mmengine.config import Config
    from mmpretrain.registry import MODELS

    from atomnas_mm.export import export_channels
    config = osp.join(ROOT, 'configs/demo/resnet-18_fashion_mnist_search.py')
    model = MODELS.build(Config.fromfile(config).model)
    apply_plan(model, {'backbone.layer4.0.bn2': torch.arange(100),
                       'backbone.layer2.0.bn2': torch.arange(50)})
    ckpt = dict(state_dict=model.state_dict(),
                meta=dict(channel_units=channel_widths(model)))
    paths = export_channels(ckpt, str(tmp_path / 'epoch_1.pth'),
                            str(tmp_path / 'export'), name='r18',
                            config=config)
    exported = Config.fromfile(paths['config']).model
    assert exported.type == 'atomnas_mm.Narrowed'
    exported.data_preprocessor = dict(type='ClsDataPreprocessor')
    built = MODELS.build(exported)
    built.load_state_dict(torch.load(paths['checkpoint'],
                                     weights_only=True)['state_dict'])
    assert built.head.fc.in_features == 100 and \
        built.backbone.layer3[0].downsample[0].in_channels == 50


def test_stream_combine_is_a_finder_option():
    from atomnas_mm.search.finders import ResNetStreamFinder
    net = small(18)
    unit = find_units(net, [ResNetStreamFinder(stem=False, combine='sum')])[
        'layer2.0.bn2']
    assert isinstance(unit, ResidualUnit) and unit.combine == 'sum'
    with pytest.raises(ValueError, match='combine: one of'):
        ResNetStreamFinder(combine='mean')


# The ResNet-18 demo search with the stage streams named in its finders
# (a user's child config), target 30% of the backbone.
STREAMS_CHILD = """
_base_ = [{base!r}]
custom_hooks = [
    dict(type='EMAHook', momentum=0.5, update_buffers=True,
         priority='ABOVE_NORMAL'),
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=3e-3, warmup_epochs=0),
    dict(type='atomnas_mm.AtomShrinkHook', target=dict(flops=10e6),
         deadline=0.5, interval=1, by_epoch=False, input_size=28,
         follow_path=True, finders=[dict(type='ResNetFinder'),
                                    dict(type='ResNetStreamFinder')]),
    dict(type='atomnas_mm.BNRecalibrationHook', num_batches=1),
]
"""


@pytest.mark.slow
@pytest.mark.skipif(not osp.isdir('/usr/share/datasets/fashion-mnist'),
                    reason='needs the Debian package dataset-fashion-mnist '
                    '(tools/install.sh installs it when apt is available)')
def test_streams_searched_from_a_config_through_train_and_test(tmp_path):
    """tools/train.py on a child of the ResNet-18 demo search whose
    AtomShrinkHook names ResNetStreamFinder: the target lands, stage widths
    shrink; tools/test.py loads the checkpoint with that config."""
    import subprocess
    import sys

    from harness import demo_cmd
    cfg = tmp_path / 'r18_streams.py'
    cfg.write_text(STREAMS_CHILD.format(base=osp.join(
        ROOT, 'configs/demo/resnet-18_fashion_mnist_search.py')))
    work, cache = tmp_path / 'work', tmp_path / 'data'
    out = subprocess.run(demo_cmd(work, cache, config=str(cfg)),
                         cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    ckpt = torch.load(work / 'epoch_2.pth', weights_only=True)
    assert 10e6 <= ckpt['meta']['atomnas_history'][-1]['flops'] <= 1.02e7
    full = ResNet(18, in_channels=1)
    start = {n: u.num_channels for n, u in find_units(full).items()
             if isinstance(u, ResidualUnit)}
    widths = ckpt['meta']['channel_units']
    assert start and any(widths[f'backbone.{n}'] != [w]
                         for n, w in start.items())
    out = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools/test.py'), str(cfg),
         str(work / 'epoch_2.pth'), '--work-dir', str(tmp_path / 'test'),
         '--cfg-options', f'test_dataloader.dataset.cache_dir={cache}',
         'test_dataloader.dataset.indices=32',
         'test_dataloader.num_workers=0',
         'test_dataloader.persistent_workers=False'],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert 'accuracy/top1' in out.stdout + out.stderr
