"""Models and steps shared by the benchmark scripts."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from atomnas_mm.models import AtomNAS
from atomnas_mm.models.archs import get_arch

# The demo supernet (configs/demo/atomnas_fashion_mnist.py): 28x28 grey.
DEMO_ROWS = [
    [16, 1, 1, [3], [16], False],
    [24, 1, 2, [3, 5, 7], [48, 48, 48], True],
    [24, 1, 1, [3, 5, 7], [72, 72, 72], True],
    [40, 1, 2, [3, 5, 7], [72, 72, 72], True],
    [40, 1, 1, [3, 5, 7], [120, 120, 120], True],
    [64, 1, 1, [3, 5, 7], [120, 120, 120], True],
]
DEMO = dict(arch=dict(rows=DEMO_ROWS, stem_channels=16, last_channels=256),
            in_channels=1, num_classes=10, size=28)


def imagenet_setting(arch='supernet'):
    spec = get_arch(arch)
    return dict(arch=spec, in_channels=3, num_classes=1000, size=224)


class Classifier(nn.Module):
    """Backbone + global average pool + FC, as in the mmpretrain configs."""

    def __init__(self, backbone, channels, num_classes):
        super().__init__()
        self.backbone = backbone
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.backbone(x)[-1]
        return self.fc(self.pool(x).flatten(1))


def atomnas_classifier(setting, arch=None):
    arch = copy.deepcopy(arch or setting['arch'])
    bb = AtomNAS(arch=arch, in_channels=setting['in_channels'])
    return Classifier(bb, bb.last_channels, setting['num_classes'])


def set_forms(model, train=None, cache_inference=None):
    """Pin the forward forms of every AtomicBlock of ``model`` (in place).

    Args:
        train (str, optional): ``'per_kernel'`` or ``'modules'`` on every
            device (``AtomicBlock.train_forms``); None keeps the default.
        cache_inference (bool, optional): ``AtomicBlock.cache_inference``.
    """
    from atomnas_mm.models.blocks import AtomicBlock
    for m in model.modules():
        if isinstance(m, AtomicBlock):
            if train is not None:
                m.train_forms = dict(cpu=train, cuda=train)
            if cache_inference is not None:
                m.cache_inference = cache_inference
    return model


def train_step(model, opt, x, y, amp=False):
    """forward + backward + optimizer step; returns a callable.

    With ``amp``: CUDA autocast fp16 and a GradScaler, as mmengine's
    AmpOptimWrapper does.
    """
    scaler = torch.amp.GradScaler('cuda') if amp else None

    def step():
        opt.zero_grad(set_to_none=True)
        if amp:
            with torch.autocast('cuda', dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    return step


def prepare(model, dev, memory_format, batch, setting, lr=0.01, amp=False):
    """Model on ``dev`` in a memory format with its batch, optimizer, step."""
    from _timing import to_format
    model = to_format(model.to(dev), memory_format).train()
    x = torch.randn(batch, setting['in_channels'], setting['size'],
                    setting['size'], device=dev)
    x = to_format(x, memory_format)
    y = torch.randint(0, setting['num_classes'], (batch, ), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return train_step(model, opt, x, y, amp=amp)
