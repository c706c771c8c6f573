"""The tracing finder (atomnas_mm.search.tracing): agreement with the
hand-written finders, exact surgery on what it takes, refusals naming the
module and the reason, costs, and a search through tools/train.py and
tools/test.py of a backbone only the tracing finder knows (mmpretrain's
VGG-11 with BN)."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from mmpretrain.models import VGG, MobileNetV2, ResNet

import atomnas_mm  # noqa: F401
from atomnas_mm.search.costs import FLOPsCost, ParamsCost
from atomnas_mm.search.finders import (DEFAULT_FINDERS, MobileNetV2Finder,
                                       ResNetFinder)
from atomnas_mm.search.shrink import apply_plan, backbone_cost, width_cost_of
from atomnas_mm.search.tracing import TracingFinder
from atomnas_mm.search.units import SearchRefused, find_units, require_units
from harness import ROOT, calibrated, remove_at_random, write_images


def traced(model, fallback=False):
    skipped = []
    units = {u.name: u for u in TracingFinder(fallback)(model, skipped,
                                                         set())}
    return units, skipped


@pytest.mark.parametrize('make,finder', [
    (lambda: MobileNetV2(widen_factor=0.5), MobileNetV2Finder()),
    (lambda: ResNet(18), ResNetFinder()),
    (lambda: ResNet(50, base_channels=16), ResNetFinder())],
    ids=['mmpretrain-mobilenet-v2', 'mmpretrain-resnet-18',
         'mmpretrain-resnet-50'])
def test_agrees_with_the_hand_written_finders(make, finder):
    """Same gate, producers, consumers, folds and activation for every unit
    a hand-written finder takes; beyond them (MobileNetV2) only the three
    units between blocks that the graph proves plain."""
    model = make()
    hand = {u.name: u for u in finder(model, [], set())}
    units, skipped = traced(model)
    assert hand and set(hand) <= set(units)
    for name, unit in hand.items():
        mine = units[name]
        assert mine.gate is unit.gate
        assert {id(m) for m in mine.producers} == {
            id(m) for m in unit.producers}
        assert [(id(layer), id(fold) if isinstance(fold, nn.Module) else fold)
                for layer, fold in mine.consumers] == [
            (id(layer), id(fold) if isinstance(fold, nn.Module) else fold)
            for layer, fold in unit.consumers]
        beta = torch.randn(1, unit.num_channels, 1, 1) * 8
        assert torch.equal(mine.act(beta), unit.act(beta))
    extra = set(units) - set(hand)
    if isinstance(model, MobileNetV2):
        # stem -> first depthwise -> projection; the first block's output
        # (read by the next expand conv); the last block's (read by conv2)
        assert extra == {'layer1.0.conv.0.bn', 'layer1.0.conv.1.bn',
                         'layer7.0.conv.2.bn'}
        assert ('conv2.bn', 'its channels reach the output of the model: '
                'not searched') in skipped
    else:
        assert not extra
    # every BN that is neither a gate nor a producer is listed with a reason
    gates = {id(m) for u in units.values() for m in u.producers}
    listed = {name for name, _ in skipped}
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and id(m) not in gates:
            assert name in listed, name
    assert any('an addition (a residual?)' in why for _, why in skipped)


def test_torchvision_mobilenet_v2_units_and_exact_removal():
    """Plain nn.Modules through find_units (no hand-written finder knows
    torchvision's blocks): every hidden unit, the stem through the first
    depthwise, the block outputs not read by an addition and the last conv
    into the classifier (its constant into the Linear's bias); removing the
    dead channels keeps the eval output."""
    model = calibrated(tvm.mobilenet_v2(num_classes=10, width_mult=0.5))
    skipped = []
    units = find_units(model, skipped=skipped)
    assert all(isinstance(u.producers[0], nn.Conv2d) for u in units.values())
    assert len(units) == 20 and len(skipped) == 15
    hidden = units['features.2.conv.1.1']
    block = model.features[2].conv
    assert hidden.producers == [block[0][0], block[0][1], block[1][0],
                                block[1][1]]
    assert hidden.consumers == [(block[2], block[3])]
    assert units['features.18.1'].consumers == [(model.classifier[1], 'bias')]
    assert dict(skipped)['features.3.conv.3'].startswith(
        'its channels reach add (add in the traced graph): an addition')
    x = torch.randn(2, 3, 32, 32)
    plan = {}
    for name, unit in units.items():
        with torch.no_grad():
            unit.gate.weight[::2] = 0
        plan[name] = torch.arange(1, unit.num_channels, 2)
        assert unit.error_bound(plan[name]) == 0
    with torch.no_grad():
        before = model(x)
        apply_plan(model, plan)
        after = model(x)
    assert model.classifier[1].in_features == units['features.18.1'] \
        .num_channels < 1280
    assert torch.allclose(before, after, atol=1e-4), \
        (before - after).abs().max()


def test_torchvision_resnet_18_inner_channels_only():
    units, skipped = traced(tvm.resnet18())
    assert sorted(units) == sorted(f'layer{i}.{j}.bn1' for i in range(1, 5)
                                   for j in range(2))
    for unit in units.values():
        assert [type(m) for m in unit.producers] == [nn.Conv2d,
                                                     nn.BatchNorm2d]
        (layer, fold), = unit.consumers
        assert layer.kernel_size == (3, 3) and isinstance(fold,
                                                          nn.BatchNorm2d)
    # bn2 of every block and the stem feed additions
    assert len(skipped) == 12 and all('an addition' in why
                                      for _, why in skipped)


class Plain(nn.Module):
    """conv-BN-ReLU, a searchable stage, then ``tail`` on the second BN."""

    def __init__(self, tail):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.conv4 = nn.Conv2d(8, 4, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 3)
        self.tail = tail

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        z = self.conv2(x)
        y = self.bn2(z)
        if self.tail == 'add':
            return self.conv3(F.relu(y + x))
        if self.tail == 'cat':
            return self.conv3(torch.cat([y, y], 1)[:, :8])
        if self.tail == 'flatten':
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 4), 1))
        if self.tail == 'unknown':
            return self.conv3(torch.cumsum(y, 1))
        if self.tail == 'se':
            return self.conv3(y * torch.sigmoid(y.mean((2, 3), keepdim=True)))
        if self.tail == 'groupnorm':
            return self.conv3(self.gn(y))
        if self.tail == 'grouped':
            return self.conv3(self.grouped(y))
        if self.tail == 'two-acts':
            return self.conv3(F.relu(y)), self.conv4(y)
        if self.tail == 'read-twice':
            return self.conv3(y), self.conv4(z)
        if self.tail == 'untraceable':
            return self.conv3(y) if y.sum() > 0 else y
        return self.conv3(y)


@pytest.mark.parametrize('tail,why', [
    ('add', 'bn1: its channels reach add (add in the traced graph): an '
     'addition (a residual?): not searched'),
    ('cat', 'bn2: its channels reach cat (cat in the traced graph): a '
     'concatenation'),
    ('flatten', 'bn2: its channels are flattened by flatten (flatten in the '
     'traced graph) with more than one position'),
    ('unknown', 'bn2: its channels reach cumsum (cumsum in the traced '
     'graph), which the tracing finder does not know'),
    ('se', 'bn2: its channels reach mul (mul in the traced graph): a product '
     'with another tensor (an SE gate or attention)'),
    ('groupnorm', 'bn2: its channels reach gn, a GroupNorm, not a BatchNorm'),
    ('grouped', 'bn2: its channels reach the grouped conv grouped '
     '(groups=2), which couples them'),
    ('two-acts', 'bn2: its readers see it through different activations'),
    ('read-twice', 'bn2: its channels are also read before it'),
    ('untraceable', 'Plain: torch.fx cannot trace it (TraceError: ')])
def test_refusals_name_the_module_and_the_reason(tail, why):
    model = Plain(tail)
    skipped = []
    units = find_units(model, skipped=skipped)
    assert any(why in f'{name}: {reason}' for name, reason in skipped), \
        skipped
    # nothing left (read-twice: conv2 has no BN of its own to fold bn1's
    # constant into either): refused as a whole
    if tail in ('add', 'untraceable', 'read-twice'):
        with pytest.raises(SearchRefused, match=re.escape(why)):
            require_units(model)
    else:  # conv1's channels are plain: bn1 is a unit
        assert list(units) == ['bn1']
    with torch.no_grad():  # and the plain model takes both
        model.tail = 'plain'
    if tail != 'untraceable':
        assert list(find_units(model)) == ['bn1', 'bn2']


def test_frozen_and_no_fold_target_are_not_searched():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1))
    model[5].weight.requires_grad_(False)
    skipped = []
    assert find_units(model, skipped=skipped) == {}
    assert ('1', '3 reads its channels but has no BN after it nor a bias to '
            'take a removed channel\'s constant: not searched') in skipped
    assert ('6', 'frozen (requires_grad=False): not searched') in skipped


def test_known_models_search_as_without_tracing():
    """The tracing finder only acts where the hand-written finders claimed
    nothing: a model they know keeps exactly their units."""
    for model in (MobileNetV2(widen_factor=0.5), ResNet(18)):
        assert list(find_units(model)) == list(
            find_units(model, finders=DEFAULT_FINDERS[:-1]))
    assert isinstance(DEFAULT_FINDERS[-1], TracingFinder)
    # named with fallback=False it takes what the others left, no unit
    # touching a module they claimed (the blocks with expansion)
    model = MobileNetV2(widen_factor=0.5)
    both = find_units(model, finders=[dict(type='MobileNetV2Finder'), dict(
        type='TracingFinder', fallback=False)])
    assert set(both) - set(find_units(
        model, finders=[dict(type='MobileNetV2Finder')])) == {
            'layer1.0.conv.0.bn'}


@pytest.mark.parametrize('cost', [FLOPsCost(32), ParamsCost()],
                         ids=['flops', 'params'])
@pytest.mark.parametrize('make', [
    lambda: VGG(11, norm_cfg=dict(type='BN')),
    lambda: tvm.mobilenet_v2(width_mult=0.5)], ids=['vgg-11', 'tv-mbv2'])
def test_width_cost_predicts_the_shrunk_model(make, cost):
    model = make()
    widths = width_cost_of(model, cost)
    assert widths.units and widths.total == backbone_cost(model, cost)
    plan = remove_at_random(widths)
    apply_plan(model, plan)
    assert backbone_cost(model, cost) == widths.total


# mmpretrain's VGG-11 with BN (no hand-written finder knows it) in an
# ImageClassifier, the search hooks, tiny random images at 32 px.
TINY_VGG = """
custom_imports = dict(imports=['atomnas_mm'], allow_failed_imports=False)
model = dict(type='ImageClassifier',
             backbone=dict(type='VGG', depth=11, norm_cfg=dict(type='BN')),
             neck=dict(type='GlobalAveragePooling'),
             head=dict(type='LinearClsHead', num_classes=2, in_channels=512,
                       loss=dict(type='CrossEntropyLoss'), topk=(1, )))
data_preprocessor = dict(num_classes=2, mean=[128.] * 3, std=[64.] * 3,
                         to_rgb=True)
pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=32),
            dict(type='PackInputs')]
data = dict(type='CustomDataset', data_root={data!r}, pipeline=pipeline)
train_dataloader = dict(batch_size=4, num_workers=0, dataset=data,
                        sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(batch_size=4, num_workers=0, dataset=data,
                      sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9))
train_cfg = dict(by_epoch=True, max_epochs=2, val_interval=2)
val_cfg = dict()
test_cfg = dict()
default_scope = 'mmpretrain'
default_hooks = dict(logger=dict(type='LoggerHook', interval=1),
                     checkpoint=dict(type='CheckpointHook', interval=2))
randomness = dict(seed=1)
custom_hooks = [
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=1e-2, warmup_epochs=0),
    dict(type='atomnas_mm.AtomShrinkHook', target=dict(flops={target}),
         deadline=0.5, tolerance=0.02, follow_path=True, interval=1,
         by_epoch=False, input_size=32)]
"""


@pytest.mark.slow
def test_vgg_search_through_train_and_test(tmp_path):
    full = FLOPsCost(32).total(VGG(11, norm_cfg=dict(type='BN')))
    write_images(str(tmp_path / 'images'), num_per_class=8)
    cfg = tmp_path / 'vgg_search.py'
    cfg.write_text(TINY_VGG.format(data=str(tmp_path / 'images'),
                                   target=0.6 * full))
    env = dict(os.environ, PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1')
    env.pop('LOCAL_RANK', None)

    def run(*args):
        out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
        return out.stdout + out.stderr

    work = tmp_path / 'work'
    log = run('tools/train.py', str(cfg), '--work-dir', str(work))
    assert 'AtomShrinkHook: searching 7 channel units' in log
    assert ('backbone.features.11.bn: its channels reach the output of '
            'backbone: not searched') in log
    ckpt = torch.load(work / 'epoch_2.pth', weights_only=True)
    widths = ckpt['meta']['channel_units']
    assert sorted(widths) == sorted('backbone.' + name for name in traced(
        VGG(11, norm_cfg=dict(type='BN')))[0])
    history = ckpt['meta']['atomnas_history']
    assert history[0]['flops'] == full
    assert 0.6 * full <= history[-1]['flops'] <= 1.02 * 0.6 * full
    assert sum(w[0] for w in widths.values()) < 64 + 128 + 256 * 2 + 512 * 3
    log = run('tools/test.py', str(cfg), str(work / 'epoch_2.pth'),
              '--work-dir', str(tmp_path / 'test'))
    assert 'channel units narrowed to the checkpoint widths' in log
    assert re.search(r'accuracy/top1: [0-9.]+', log)
