"""Property test of the unit surgery: for random units and random keep-sets,
the shrunk model's eval output equals the masked model's.

The masked model is the model with the removed channels' BN scales set to 0
in every gate of their unit (a residual stream's: in every writer), and,
where a unit's fold is not exact for that keep-set (a padded ``k x k`` or
an SE-gated reader), their BN shifts too, so that the channels output 0.
Removing exactly those channels (:func:`apply_plan`, constants folded into
the readers) must then change nothing.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm
from mmpretrain.models import (EfficientNet, ImageClassifier, MobileNetV3,
                               ResNet, ResNetV1d)

import atomnas_mm  # noqa: F401
from atomnas_mm.models import AtomNAS
from atomnas_mm.search.shrink import apply_plan
from atomnas_mm.search.units import find_units
from harness import SUPERNET, calibrated


def classifier(backbone, in_channels):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ImageClassifier(
            backbone=backbone, neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=3,
                      in_channels=in_channels))


MODELS = {
    # stem, hidden channels, residual streams, last conv into the head
    'mobilenet-v2-classifier': lambda: classifier(
        dict(type='MobileNetV2', widen_factor=0.5), 1280),
    # the first block residual: its stream starts at the stem (not a unit)
    'mobilenet-v2-0.25': lambda: classifier(
        dict(type='MobileNetV2', widen_factor=0.25), 1280),
    'mobilenet-v3': lambda: MobileNetV3('small'),  # SE, HSwish
    'efficientnet': lambda: EfficientNet('b0'),  # SE, Swish
    'resnet-18-classifier': lambda: classifier(
        dict(type='ResNet', depth=18, base_channels=16, stem_channels=16),
        128),
    'resnet-50': lambda: ResNet(50, base_channels=16, stem_channels=16),
    # deep stem, average-pooling downsample
    'resnet-v1d-50': lambda: ResNetV1d(depth=50, base_channels=16,
                                       stem_channels=16),
    'torchvision-resnet-18': lambda: tvm.resnet18(num_classes=10),
    'atomnas': lambda: AtomNAS(arch=SUPERNET),
    # no hand-written finder: the tracing finder's units
    'torchvision-mobilenet-v2': lambda: tvm.mobilenet_v2(num_classes=10,
                                                         width_mult=0.5),
}

TOL = 1e-5  # of the output's largest magnitude (float32 folding)


def bn_of(model):
    """``{id(BN scale): BN}``."""
    return {id(m.weight): m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def random_keep(unit, gen):
    """A random sorted proper subset of the channels: mostly a quarter or
    more of them, one time in five down to ``min_width``."""
    n = unit.num_channels
    low = unit.min_width if torch.rand((), generator=gen) < 0.2 else \
        max(unit.min_width, n // 4)
    k = int(torch.randint(low, n, (), generator=gen))
    return torch.randperm(n, generator=gen)[:k].sort().values


def mask(model, unit, keep):
    """Silence the channels not in ``keep`` in every gate of ``unit``:
    scales 0; shifts 0 too where removing them would not be exact."""
    removed = torch.ones(unit.num_channels, dtype=torch.bool)
    removed[keep] = False
    norms = bn_of(model)
    with torch.no_grad():
        for gamma, start in unit.gamma_slices():
            part = removed[start:start + len(gamma)]
            gamma[part] = 0
        if unit.error_bound(keep) > 0:
            for gamma, start in unit.gamma_slices():
                norms[id(gamma)].bias[removed[start:start + len(gamma)]] = 0
    assert unit.error_bound(keep) == 0, unit.name


def forward(model, x):
    with torch.no_grad():
        return model(x, mode='tensor') if hasattr(model, 'head') \
            else model(x)


def flat(out):
    if isinstance(out, (tuple, list)):
        return torch.cat([flat(o) for o in out])
    return out.flatten()


@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('name', [
    n for n in MODELS])
def test_shrunk_model_equals_the_masked_model(name, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = calibrated(MODELS[name](), seed=seed)
    units = find_units(model)
    assert units, name
    plan = {}
    for unit_name, unit in units.items():
        if unit.num_channels > unit.min_width and \
                torch.rand((), generator=gen) < 0.7:
            plan[unit_name] = random_keep(unit, gen)
            mask(model, unit, plan[unit_name])
    assert plan
    x = torch.randn(2, 3, 32, 32, generator=gen)
    masked = flat(forward(model, x))
    other = flat(forward(model, torch.randn(2, 3, 32, 32, generator=gen)))
    scale = masked.abs().max().clamp(min=1.0)
    # the output depends on the input well above the tolerance
    assert (masked - other).abs().max() > 100 * TOL * scale
    shrunk = copy.deepcopy(model)
    apply_plan(shrunk, plan)
    narrowed = find_units(shrunk)  # an emptied AtomNAS block is no unit
    assert all(sum(narrowed[n].widths()) == len(k) if n in narrowed
               else len(k) == 0 for n, k in plan.items())
    out = flat(forward(shrunk, x))
    error = ((out - masked).abs().max() / scale).item()
    assert error <= TOL, (name, seed, error)
