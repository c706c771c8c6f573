"""BN re-calibration: the function, and the hook's hand-off to checkpoints."""
import copy
import os.path as osp

import torch
from mmengine.model import BaseModel

from atomnas_mm.engine.hooks import recalibrate_bn
from harness import build, make_cfg


class Net(BaseModel):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.bn = torch.nn.BatchNorm2d(4, momentum=0.01)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        return self.bn(self.conv(inputs))


def test_recalibrate_bn_is_the_plain_average():
    net = Net()
    batches = [dict(inputs=torch.randn(8, 3, 5, 5) * (i + 1) + i)
               for i in range(3)]
    net.bn.running_mean.fill_(7.)
    net.eval()
    assert recalibrate_bn(net, batches) == 3
    assert not net.bn.training and net.bn.momentum == 0.01
    with torch.no_grad():
        feats = [net.conv(b['inputs']) for b in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3)) for f in feats]).mean(0)
    assert torch.allclose(net.bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(net.bn.running_var, var, atol=1e-4)


def test_checkpoint_holds_recalibrated_ema_statistics(tmp_path):
    cfg = make_cfg(str(tmp_path), max_epochs=1)
    cfg['custom_hooks'] = [
        dict(type='EMAHook', momentum=0.1, update_buffers=True),
        dict(type='atomnas_mm.BNRecalibrationHook', num_batches=1)]
    runner = build(cfg)
    runner.train()
    ckpt = torch.load(osp.join(str(tmp_path), 'epoch_1.pth'),
                      weights_only=True)
    # state_dict holds the EMA weights (EMAHook swaps them in at save).
    model = copy.deepcopy(runner.model)
    model.load_state_dict(ckpt['state_dict'])
    key = 'backbone.conv1.bn.running_mean'
    saved = ckpt['state_dict'][key].clone()
    assert not torch.allclose(saved, ckpt['ema_state_dict']['module.' + key])
    first = next(iter(runner.train_dataloader))  # same epoch: same order
    recalibrate_bn(model, [first])
    assert torch.allclose(model.state_dict()[key], saved, atol=1e-5)
