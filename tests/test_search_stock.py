"""Searching stock models the way users run it: configs/search (mmpretrain's
MobileNetV2 recipe, mmdet's Faster R-CNN and RetinaNet) on tiny data through
tools/train.py, tools/test.py, tools/export_searched.py and mmdet's own
tools, in subprocesses."""
import glob
import json
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

import atomnas_mm  # noqa: F401
from atomnas_mm.search.costs import FLOPsCost
from harness import free_port, run_dist_train, write_images

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
ENV = dict(os.environ, PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1')
ENV.pop('LOCAL_RANK', None)


def run(args, cwd, timeout=600):
    out = subprocess.run([sys.executable, *args], cwd=str(cwd), env=ENV,
                         capture_output=True, text=True, timeout=timeout)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    return log


# A stock mmpretrain recipe + the search hooks, unchanged but for tiny data
# (16 images of 2 classes at 32 px, batch 4: 4 iterations an epoch), a fixed
# seed, a smaller lr and a budget for 32 px checked every iteration.
TINY_SEARCH = """
_base_ = [{base!r}]
custom_imports = dict(imports=['atomnas_mm'], allow_failed_imports=False)
model = dict(head=dict(num_classes=2, topk=(1, )))
pipeline = [dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=32), dict(type='PackInputs')]
data = dict(_delete_=True, type='CustomDataset', data_root={data!r},
            pipeline=pipeline)
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                        dataset=data)
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                      dataset=data)
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=2, val_interval=2)
default_hooks = dict(logger=dict(interval=1))
randomness = dict(seed=1)
# the recipe's lr 0.045 on tiny batches of noise reaches NaN in a few steps,
# with or without the search (batch 2, seed 1): a smaller one
optim_wrapper = dict(optimizer=dict(lr=0.005))
custom_hooks = [
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=1e-2, warmup_epochs=0),
    dict(type='atomnas_mm.AtomShrinkHook', target=dict(flops={target}),
         deadline=0.5, tolerance=0.02, follow_path=True, interval=1,
         by_epoch=False, input_size=32)]
"""


def tiny_search(tmp_path, net='mobilenet-v2'):
    """The shipped MobileNetV2 search config (``net='resnet-18'``: a child
    of mmpretrain's ResNet-18 config) on tiny data, the target 60% of the
    backbone's FLOPs at 32 px; returns (config, full, target)."""
    from mmpretrain.models import MobileNetV2, ResNet
    full = FLOPsCost(32).total(
        MobileNetV2() if net == 'mobilenet-v2' else ResNet(18))
    base = {'mobilenet-v2': osp.join(
        ROOT, 'configs/search/mobilenet-v2_8xb32_in1k_search.py'),
        'resnet-18': 'mmpretrain::resnet/resnet18_8xb32_in1k.py'}[net]
    write_images(str(tmp_path / 'images'), num_per_class=8)
    cfg = tmp_path / f'{net}_search.py'
    cfg.write_text(TINY_SEARCH.format(
        base=base, data=str(tmp_path / 'images'), target=0.6 * full))
    return cfg, full, 0.6 * full


@pytest.mark.slow
def test_stock_mobilenet_v2_search_train_test_export(tmp_path):
    cfg, full, target = tiny_search(tmp_path)
    work = tmp_path / 'work'
    log = run(['tools/train.py', str(cfg), '--work-dir', str(work)], ROOT)
    # 16 blocks' hidden channels, the stem, 7 residual streams, the last conv
    assert 'AtomShrinkHook: searching 25 channel units' in log
    assert re.search(r'AtomShrinkHook: removed \d+ atoms', log)
    ckpt = torch.load(work / 'epoch_2.pth', weights_only=True)
    widths = ckpt['meta']['channel_units']
    assert len(widths) == 25 and ckpt['meta']['atomnas_arch'] == {}
    history = ckpt['meta']['atomnas_history']
    assert history[0]['flops'] == full
    assert target <= history[-1]['flops'] <= 1.02 * target
    hidden = ckpt['state_dict']['backbone.layer2.0.conv.1.conv.weight']
    assert hidden.shape[0] == widths['backbone.layer2.0.conv.1.bn'][0] < 96
    assert json.loads((work / 'searched_arch.json').read_text()) == dict(
        channel_units=widths)

    # the unedited search config tests the narrow checkpoint
    log = run(['tools/test.py', str(cfg), str(work / 'epoch_2.pth'),
               '--work-dir', str(tmp_path / 'test')], ROOT)
    assert 'channel units narrowed to the checkpoint widths' in log
    assert re.search(r'accuracy/top1: [0-9.]+', log)

    # export: a standalone config (stock backbone, narrowed) and the weights
    log = run(['tools/export_searched.py', str(work), '--out',
               str(tmp_path / 'export'), '--name', 'mbv2'], ROOT)
    text = (tmp_path / 'export' / 'mbv2.py').read_text()
    assert "type='atomnas_mm.Narrowed'" in text and 'AtomShrinkHook' not in \
        text and "type='MobileNetV2'" in text
    if widths['backbone.conv2.bn'][0] < 1280:  # the head's fc narrowed too
        assert "'backbone.conv2.bn'" in text and "type='ImageClassifier'" in \
            text.split("type='atomnas_mm.Narrowed'")[1]
    assert json.loads((tmp_path / 'export' / 'channel_units.json')
                      .read_text()) == widths
    log = run(['tools/test.py', str(tmp_path / 'export' / 'mbv2.py'),
               str(tmp_path / 'export' / 'mbv2.pth'),
               '--work-dir', str(tmp_path / 'test2')], ROOT)
    assert re.search(r'accuracy/top1: [0-9.]+', log)
    exported = torch.load(tmp_path / 'export' / 'mbv2.pth',
                          weights_only=True)
    assert exported['meta']['channel_units'] == widths


@pytest.mark.slow
@pytest.mark.parametrize('detector', ['faster-rcnn', 'retinanet'])
def test_stock_detector_search_with_mmdet_tools(detector, tmp_path):
    pytest.importorskip('mmdet', reason='needs mmdet')
    from mmdet.models.backbones import ResNet
    from detection_harness import SMALL_HEADS, child_config, mmdet_tool, \
        write_coco
    write_coco(str(tmp_path / 'coco'))
    backbone = ResNet(50)
    full = FLOPsCost(64).total(backbone)
    pretrained = str(tmp_path / 'r50.pth')
    torch.save(backbone.state_dict(), pretrained)
    cfg = child_config(
        str(tmp_path / 'search.py'),
        osp.join(ROOT, f'configs/search/{detector}_r50_fpn_1x_coco_search.py'),
        str(tmp_path / 'coco'), pretrained, SMALL_HEADS[detector])
    with open(cfg, 'a') as f:
        f.write(f'''
train_cfg = dict(max_epochs=2, val_interval=10)
custom_hooks = [
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=1e-2, warmup_epochs=0),
    dict(type='atomnas_mm.AtomShrinkHook', target=dict(flops={0.8 * full}),
         deadline=0.5, follow_path=True, interval=1, by_epoch=False,
         input_size=64)]
log_level = 'INFO'
''')
    work = str(tmp_path / 'work')
    log = mmdet_tool('train', [cfg, '--work-dir', work], tmp_path)
    # stage 1 is frozen by the stock config: not searched, and said so
    assert 'AtomShrinkHook: searching 26 channel units' in log
    assert 'backbone.layer1.0.bn1: frozen' in log
    ckpt = torch.load(osp.join(work, 'epoch_2.pth'), weights_only=True)
    flops = ckpt['meta']['atomnas_history'][-1]['flops']
    assert 0.8 * full <= flops <= 0.8 * full * 1.02
    assert ckpt['meta']['channel_units']['backbone.layer3.0.bn2'][0] <= 256
    log = mmdet_tool('test', [cfg, osp.join(work, 'epoch_2.pth'),
                              '--work-dir', str(tmp_path / 'test')], tmp_path)
    assert 'channel units narrowed to the checkpoint widths' in log
    assert re.findall(r'coco/bbox_mAP: (-?[0-9.]+)', log), log[-3000:]
    assert glob.glob(osp.join(work, '*', 'vis_data', 'scalars.json'))


@pytest.mark.slow
def test_stock_search_resumes_and_runs_on_two_gloo_ranks(tmp_path):
    cfg, _, target = tiny_search(tmp_path)

    # an uninterrupted run, then the same run 'killed' after epoch 1 (its
    # last checkpoint gone) and resumed: the same net, the same weights
    work = tmp_path / 'work'
    run(['tools/train.py', str(cfg), '--work-dir', str(work)], ROOT)
    whole = torch.load(work / 'epoch_2.pth', weights_only=True)
    first = torch.load(work / 'epoch_1.pth', weights_only=True)
    os.remove(work / 'epoch_2.pth')
    (work / 'last_checkpoint').write_text(str(work / 'epoch_1.pth'))
    log = run(['tools/train.py', str(cfg), '--work-dir', str(work),
               '--resume'], ROOT)
    assert 'channel units narrowed to the checkpoint widths' in log
    assert 'Epoch(train) [2][4/4]' in log and 'Epoch(train) [1]' not in log
    last = torch.load(work / 'epoch_2.pth', weights_only=True)
    assert target <= last['meta']['atomnas_history'][-1]['flops'] <= \
        1.02 * target
    assert last['meta']['channel_units'] == whole['meta']['channel_units']
    for name, (width, ) in last['meta']['channel_units'].items():
        assert width <= first['meta']['channel_units'][name][0]
    for key, value in whole['state_dict'].items():
        assert torch.isfinite(value.float()).all(), key
        assert torch.equal(last['state_dict'][key], value), key

    # two CPU processes (gloo): the decision is taken on rank 0 and
    # broadcast, the run lands the same way
    dist = tmp_path / 'dist'
    run_dist_train(['bash', osp.join(ROOT, 'tools/dist_train.sh'), str(cfg),
                    '2', '--work-dir', str(dist)], cwd=ROOT,
                   env=dict(ENV, PORT=str(free_port())), timeout=600)
    ckpt = torch.load(dist / 'epoch_2.pth', weights_only=True)
    assert target <= ckpt['meta']['atomnas_history'][-1]['flops'] <= \
        1.02 * target


@pytest.mark.slow
@pytest.mark.parametrize('net', ['mobilenet-v2', 'resnet-18'])
def test_stock_search_with_mmpretrain_s_own_tools(net, tmp_path):
    """mmpretrain's own tools/train.py and tools/test.py (from its package)
    on the shipped MobileNetV2 search config and a child of mmpretrain's
    ResNet-18 config with the hooks, tiny data: the budget lands in
    [T, 1.02T] and its test tool loads the narrowed checkpoint."""
    import mmpretrain
    tools = osp.join(osp.dirname(mmpretrain.__file__), '.mim', 'tools')
    if not osp.isfile(osp.join(tools, 'train.py')):
        pytest.skip(f'mmpretrain has no packaged tools in {tools}')
    cfg, full, target = tiny_search(tmp_path, net)
    work = tmp_path / 'work'
    log = run([osp.join(tools, 'train.py'), str(cfg), '--work-dir',
               str(work)], tmp_path)
    assert re.search(r'AtomShrinkHook: removed \d+ atoms', log)
    ckpt = torch.load(work / 'epoch_2.pth', weights_only=True)
    history = ckpt['meta']['atomnas_history']
    assert history[0]['flops'] == full
    assert target <= history[-1]['flops'] <= 1.02 * target
    log = run([osp.join(tools, 'test.py'), str(cfg), str(work / 'epoch_2.pth'),
               '--work-dir', str(tmp_path / 'test')], tmp_path)
    assert 'channel units narrowed to the checkpoint widths' in log
    assert re.search(r'accuracy/top1: [0-9.]+', log)
