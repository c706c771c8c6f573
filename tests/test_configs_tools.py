"""Shipped configs and command-line tools (train, test, get_flops, dist)."""
import glob
import importlib.util
import json
import os
import os.path as osp
import pickle
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import (HOOKS, MODELS, PARAM_SCHEDULERS, VISUALIZERS,
                               init_default_scope)

import atomnas_mm  # noqa: F401

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MODEL_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs/_base_/models/*.py')))
RETRAIN_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs/retrain/*.py')))
PYTHON = sys.executable
ENV = dict(os.environ, PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1')
ENV.pop('LOCAL_RANK', None)

# config: (arch, total batch on 32 GPUs)
RETRAIN = {
    'atomnas-a_in1k.py': ('atomnas_a', 2048),
    'atomnas-b_in1k.py': ('atomnas_b', 2048),
    'atomnas-c_in1k.py': ('atomnas_c', 2048),
    'atomnas-a_plus_in1k.py': ('atomnas_a_plus', 4096),
    'atomnas-b_plus_in1k.py': ('atomnas_b_plus', 4096),
    'atomnas-c_plus_in1k.py': ('atomnas_c_plus', 4096),
}


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(
        f'_tool_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_model(cfg):
    init_default_scope('mmpretrain')
    return MODELS.build(cfg.model)


def test_all_configs_present():
    names = {osp.basename(p) for p in MODEL_CONFIGS}
    for arch in ['supernet', 'a', 'b', 'c', 'a_plus', 'b_plus', 'c_plus']:
        assert f'atomnas-{arch}.py' in names
    assert {osp.basename(p) for p in RETRAIN_CONFIGS} == set(RETRAIN)


@pytest.mark.parametrize('path', MODEL_CONFIGS, ids=osp.basename)
def test_model_config_builds(path):
    cfg = Config.fromfile(path)
    assert cfg.custom_imports.imports == ['atomnas_mm']
    model = _build_model(cfg)
    assert type(model).__name__ == 'ImageClassifier'
    assert type(model.backbone).__name__ == 'AtomNAS'
    assert model.head.fc.in_features == 1280
    assert model.head.fc.out_features == 1000
    assert cfg.model.head.loss.label_smooth_val == 0.1
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000)


@pytest.mark.parametrize('path', RETRAIN_CONFIGS, ids=osp.basename)
def test_retrain_config_builds(path):
    arch, total_batch = RETRAIN[osp.basename(path)]
    cfg = Config.fromfile(path)
    assert cfg.default_scope == 'mmpretrain'
    assert cfg.custom_imports.imports == ['atomnas_mm']
    assert cfg.model.backbone.arch == arch
    assert cfg.train_dataloader.batch_size * 32 == total_batch
    assert cfg.train_cfg.max_epochs == 350
    assert cfg.randomness.seed == 1995
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[loader].dataset.data_root == 'data/imagenet'
    crop = cfg.train_dataloader.dataset.pipeline[1]
    assert crop.type == 'EfficientNetRandomCrop'
    assert crop.interpolation == 'bicubic' and crop.crop_padding == 32
    center = cfg.val_dataloader.dataset.pipeline[1]
    assert center.type == 'EfficientNetCenterCrop'
    assert center.interpolation == 'bicubic' and center.crop_padding == 32
    assert cfg.auto_scale_lr.base_batch_size == total_batch

    model = _build_model(cfg)
    assert model.backbone.arch_rows()  # the backbone of the named arch
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    group = optim_wrapper.optimizer.param_groups[0]
    assert len(optim_wrapper.optimizer.param_groups) == 1
    assert group['lr'] == pytest.approx(0.016 * total_batch / 256)
    assert group['weight_decay'] == 1e-5

    hooks = [HOOKS.build(h) for h in cfg.custom_hooks]
    assert type(hooks[0]).__name__ == 'EMAHook'
    hook = cfg.custom_hooks[0]
    assert hook.update_buffers  # EMA of the BN statistics too
    ema = MODELS.build(dict(type=hook.ema_type, model=model,
                            momentum=hook.momentum, gamma=hook.gamma,
                            update_buffers=True))
    # mmengine momentum = 1 - decay, decay = 0.9999 ** (total_batch / 4096)
    assert ema.momentum == pytest.approx(1 - 0.9999**(total_batch / 4096))
    assert 1 - ema.momentum == pytest.approx(0.9999**(total_batch / 4096))
    # the default hooks build (VisualizationHook needs a visualizer first)
    VISUALIZERS.build(dict(cfg.visualizer, name=f'test_{arch}'))
    for hook in cfg.default_hooks.values():
        HOOKS.build(hook)


def _lr_curve(cfg, num_iters, epoch_length):
    param = torch.nn.Parameter(torch.zeros(1))
    optim_wrapper = build_optim_wrapper(
        torch.nn.Linear(1, 1), cfg.optim_wrapper)
    optimizer = optim_wrapper.optimizer
    optimizer.param_groups[0]['params'] = [param]
    schedulers = []
    for s in cfg.param_scheduler:
        s = s.copy()
        if s.pop('convert_to_iter_based', False):
            s['epoch_length'] = epoch_length
            scheduler_cls = PARAM_SCHEDULERS.get(s.pop('type'))
            schedulers.append(scheduler_cls.build_iter_from_epoch(
                optimizer=optim_wrapper, **s))
        else:
            schedulers.append(PARAM_SCHEDULERS.build(
                s, default_args=dict(optimizer=optim_wrapper)))
    lrs = []
    for _ in range(num_iters):
        lrs.append(optimizer.param_groups[0]['lr'])
        for s in schedulers:
            s.step()
    return np.array(lrs)


@pytest.mark.parametrize('name', ['atomnas-a_in1k.py',
                                  'atomnas-a_plus_in1k.py'])
def test_retrain_lr_schedule(name):
    cfg = Config.fromfile(osp.join(ROOT, 'configs/retrain', name))
    total = RETRAIN[name][1]
    epoch = cfg.iters_per_epoch
    # DefaultSampler on 32 ranks: ceil(ceil(1281167 / 32) / batch) iters.
    assert epoch == {2048: 626, 4096: 313}[total]
    step = cfg.param_scheduler[1].step_size
    assert step == round(2.4 * epoch)
    peak = 0.016 * total / 256
    lrs = _lr_curve(cfg, 6 * epoch + 1, epoch)
    t = np.arange(len(lrs))
    # warm-up from 0.016 (the per-256 lr), linear over 5 epochs (mmengine's
    # LinearLR reaches the peak at the last warm-up iteration), times the
    # staircase 0.97 ** (t // step) counted from iteration 0.
    warm_iters = 5 * epoch - 1
    warm = 256 / total + (1 - 256 / total) * np.minimum(t, warm_iters) / (
        warm_iters)
    expected = peak * warm * 0.97**(t // step)
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert lrs[0] == pytest.approx(0.016)
    assert lrs[5 * epoch] == pytest.approx(peak * 0.97**2)
    assert lrs[6 * epoch] == pytest.approx(peak * 0.97**(6 * epoch // step))


def test_ema_warmup_matches_reference():
    cfg = Config.fromfile(osp.join(ROOT, 'configs/retrain/atomnas-a_in1k.py'))
    hook = cfg.custom_hooks[0]
    model = torch.nn.Linear(1, 1, bias=False)
    ema = MODELS.build(dict(type=hook.ema_type, model=model,
                            momentum=hook.momentum, gamma=hook.gamma))
    with torch.no_grad():
        model.weight.fill_(0.)
    ema.update_parameters(model)  # steps 0: copy
    decay = 0.9999**0.5
    avg = 0.
    for t in range(30):
        with torch.no_grad():
            model.weight.fill_(float(t + 1))
        ema.update_parameters(model)
        d = min(decay, (1 + t) / (10 + t))  # reference EMA warm-up
        avg = d * avg + (1 - d) * (t + 1)
        assert ema.module.weight.item() == pytest.approx(avg, rel=1e-5)


def test_cpu_ddp_workaround(monkeypatch):
    train_tool = _load_tool('train')
    monkeypatch.setattr(torch.cuda, 'set_device', torch.cuda.set_device)
    cfg = Config(dict(env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    assert not train_tool.apply_cpu_ddp_workaround(cfg, 'none')
    assert 'model_wrapper_cfg' not in cfg
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert not train_tool.apply_cpu_ddp_workaround(cfg, 'pytorch')
    assert cfg.env_cfg.dist_cfg.backend == 'nccl'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert train_tool.apply_cpu_ddp_workaround(cfg, 'pytorch')
    assert cfg.model_wrapper_cfg == dict(
        type='MMDistributedDataParallel', device_ids=None,
        broadcast_buffers=False)
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    torch.cuda.set_device(3)  # a no-op now
    own = Config(dict(model_wrapper_cfg=dict(type='Mine')))
    train_tool.apply_cpu_ddp_workaround(own, 'pytorch')
    assert own.model_wrapper_cfg == dict(type='Mine')


def test_get_flops_atomnas_a(tmp_path):
    out = subprocess.run(
        [PYTHON, osp.join(ROOT, 'tools/analysis_tools/get_flops.py'),
         osp.join(ROOT, 'configs/_base_/models/atomnas-a.py'),
         '--shape', '224'],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ours = re.search(r'^AtomNAS.*?([\d.]+)\s+([\d.]+)\s*$', out.stdout, re.M)
    mm = re.search(r'^mmengine.*?([\d.]+)\s+([\d.]+)\s*$', out.stdout, re.M)
    assert ours and mm, out.stdout
    flops, params = float(ours.group(1)), float(ours.group(2))
    assert 257.5 < flops < 259.0  # published: 258M
    assert 3.8 < params < 4.0  # published: 3.9M
    # mmengine also counts BN (eval: one op per element) and BN params.
    assert float(mm.group(1)) > flops and float(mm.group(2)) > params


def _write_images(root, num_per_class):
    import cv2
    rng = np.random.default_rng(0)
    for cls in ('cat', 'dog'):
        os.makedirs(osp.join(root, cls), exist_ok=True)
        for i in range(num_per_class):
            img = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            cv2.imwrite(osp.join(root, cls, f'{i}.png'), img)


TINY_CONFIG = """
_base_ = [{base!r}]
model = dict(head=dict(num_classes=2, topk=(1, )))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='EfficientNetRandomCrop', scale=32, backend='pillow',
         interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='EfficientNetCenterCrop', crop_size=32, backend='pillow',
         interpolation='bicubic'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False, pin_memory=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root={data!r},
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False, pin_memory=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root={data!r},
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1)
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(save_best=None))
"""


@pytest.fixture(scope='module')
def tiny_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('tiny')
    _write_images(str(tmp / 'images'), num_per_class=2)
    path = tmp / 'tiny_atomnas_a.py'
    path.write_text(TINY_CONFIG.format(
        base=osp.join(ROOT, 'configs/retrain/atomnas-a_in1k.py'),
        data=str(tmp / 'images')))
    return str(path)


def _run(args, cwd, timeout=300, env=ENV):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    return out


def _logged_iters(work_dir):
    scalars = glob.glob(osp.join(work_dir, '*/vis_data/scalars.json'))
    iters = []
    for path in scalars:
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if 'loss' in record:
                    assert np.isfinite(record['loss'])
                    iters.append(record['iter'])
    return sorted(iters)


def test_train_test_resume(tiny_config, tmp_path):
    work_dir = str(tmp_path / 'work')
    # from another directory, 2 iterations (4 images, batch 2, 1 epoch)
    _run([PYTHON, osp.join(ROOT, 'tools/train.py'), tiny_config,
          '--work-dir', work_dir], cwd=tmp_path)
    ckpt = osp.join(work_dir, 'epoch_1.pth')
    assert osp.isfile(ckpt)
    assert _logged_iters(work_dir) == [1, 2]
    state = torch.load(ckpt, map_location='cpu', weights_only=True)
    assert 'ema_state_dict' in state  # EMAHook of the retrain recipe

    # test.py reloads the checkpoint and evaluates it
    metrics = str(tmp_path / 'metrics.pkl')
    _run([PYTHON, osp.join(ROOT, 'tools/test.py'), tiny_config, ckpt,
          '--work-dir', str(tmp_path / 'test'), '--out', metrics,
          '--out-item', 'metrics'], cwd=tmp_path)
    with open(metrics, 'rb') as f:
        result = pickle.load(f)
    assert 0 <= result['accuracy/top1'] <= 100

    # --resume (auto) continues from epoch 1 to epoch 2
    _run([PYTHON, osp.join(ROOT, 'tools/train.py'), tiny_config,
          '--work-dir', work_dir, '--resume',
          '--cfg-options', 'train_cfg.max_epochs=2'], cwd=tmp_path)
    assert osp.isfile(osp.join(work_dir, 'epoch_2.pth'))
    assert _logged_iters(work_dir) == [1, 2, 3, 4]


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_dist_train_two_cpu_processes(tiny_config, tmp_path):
    work_dir = str(tmp_path / 'work')
    env = dict(ENV, PYTHON=PYTHON, PORT=str(_free_port()))
    # 4 images on 2 ranks with batch 2: 1 iteration per epoch, 2 epochs.
    _run(['bash', osp.join(ROOT, 'tools/dist_train.sh'), tiny_config, '2',
          '--work-dir', work_dir, '--cfg-options', 'train_cfg.max_epochs=2'],
         cwd=tmp_path, env=env, timeout=300)
    assert osp.isfile(osp.join(work_dir, 'epoch_2.pth'))
    assert _logged_iters(work_dir) == [1, 2]
    # The CPU workaround of tools/train.py: gloo, DDP without device_ids.
    log = open(glob.glob(osp.join(work_dir, '*/*.log'))[0]).read()
    assert 'Distributed training: True' in log and 'GPU number: 2' in log
    assert "dist_cfg=dict(backend='gloo')" in log
    assert 'device_ids=None' in log
