"""Search results behave like any mm checkpoint (docs/method.md, "Shrinking").

One short search of the Fashion-MNIST demo (a child of
``configs/demo/atomnas_fashion_mnist.py`` written here, with
``paramwise_cfg``) through ``tools/train.py``; then, with that unedited
config: this project's and mmpretrain's own ``tools/test.py`` on the shrunk
checkpoints, ``mmpretrain.get_model(config, pretrained=ckpt)``,
``FeatureExtractor`` and ``inference_model`` on an image file, an exact
``--resume``, the log names, and an unsupported optimizer setup stopped in
``before_train``.
"""
import json
import os
import os.path as osp
import re
import subprocess
import sys
import textwrap

import pytest

from atomnas_mm.datasets import DEBIAN_ROOT

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO = osp.join(ROOT, 'configs', 'demo', 'atomnas_fashion_mnist.py')
LOG_KEYS = ('loss_total', 'loss_penalty', 'loss_wd', 'penalty_rho',
            'penalty_l1', 'backbone_flops', 'backbone_params')

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not osp.isdir(DEBIAN_ROOT),
        reason='needs the Debian package dataset-fashion-mnist '
        '(tools/install.sh installs it when apt is available)')]

# 256 training images, 2 epochs of 8 iterations. A strong penalty and a loose
# threshold kill atoms within a few iterations; shrinks are checked every 4.
# Nothing random but the data order (no dropout, no flip), so a resumed run
# must repeat the uninterrupted one exactly. Test images are read from files
# as BGR by the inferencers: RandomGrayscale(prob=1) keeps one of the three
# equal channels (exact; a no-op on the dataset's grey arrays).
SEARCH = '''
_base_ = {demo!r}
model = dict(head=dict(dropout_rate=0.0))
train_dataloader = dict(
    batch_size=32, num_workers=0, persistent_workers=False,
    dataset=dict(indices=256, cache_dir={cache!r},
                 pipeline=[dict(type='PackInputs')]))
val_dataloader = dict(
    batch_size=64, num_workers=0, persistent_workers=False,
    dataset=dict(indices=128, cache_dir={cache!r},
                 pipeline=[dict(type='RandomGrayscale', prob=1.0,
                                channel_weights=(1., 0., 0.)),
                           dict(type='PackInputs')]))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(weight_decay=1e-4),
                     paramwise_cfg=dict(norm_decay_mult=0.))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, T_max=2,
         convert_to_iter_based=True)]
train_cfg = dict(max_epochs=2, val_interval=1)
custom_hooks = [
    dict(type='EMAHook', momentum=0.9, update_buffers=True,
         priority='ABOVE_NORMAL'),
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=0.1, warmup_epochs=0,
         weight_decay=4e-5),
    dict(type='atomnas_mm.AtomShrinkHook', threshold=0.5,
         min_removed_flops=0, interval=4, by_epoch=False, input_size=28),
    dict(type='atomnas_mm.BNRecalibrationHook', num_batches=2)]
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(max_keep_ckpts=2, save_best=None))
log_processor = dict(window_size=1)  # per-iteration values in the scalars
'''

# A user's multi-optimizer constructor (as in GAN codebases): one
# OptimWrapper for the backbone, one for the rest.
TWO_OPTIMIZERS = '''
from mmengine.optim import OptimWrapperDict, build_optim_wrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class BackboneAndRest:
    def __init__(self, optim_wrapper_cfg, paramwise_cfg=None):
        self.cfg = optim_wrapper_cfg

    def __call__(self, model):
        return OptimWrapperDict(**{
            name: build_optim_wrapper(getattr(model, name), cfg)
            for name, cfg in self.cfg.items()})
'''

# get_model / FeatureExtractor / inference_model in a fresh interpreter. The
# search config goes into a model index of its own (inference_model, unlike
# get_model, takes model-index names only).
INFER = '''
import json, sys
import cv2, numpy as np, torch
import atomnas_mm
from mmpretrain import FeatureExtractor, get_model, inference_model
from mmpretrain.apis import ModelHub
cfg, ckpt, index, image = sys.argv[1:5]
model = get_model(cfg, pretrained=ckpt)
model.eval()
x = torch.from_numpy(cv2.imread(image, cv2.IMREAD_GRAYSCALE))[None, None]
with torch.no_grad():
    scores = model(model.data_preprocessor(
        dict(inputs=x.float()), False)['inputs'], mode='predict')[0].pred_score
feats = FeatureExtractor(cfg, pretrained=ckpt)(image)[0]
ModelHub.register_model_index(index, config_prefix=sys.argv[5])
result = inference_model('tiny-search_fashion-mnist', image, pretrained=ckpt)
print('RESULT', json.dumps(dict(
    rows=model.backbone.arch_rows(), scores=scores.tolist(),
    feats=[list(f.shape) for f in feats],
    inference=result['pred_scores'].tolist(),
    label=result['pred_label'])))
'''

INDEX = '''
Models:
  - Name: tiny-search_fashion-mnist
    Metadata:
      FLOPs: 0
    Results:
      - Task: Image Classification
        Dataset: Fashion-MNIST
        Metrics:
          Top 1 Accuracy: 0
    Config: search.py
'''


def run(args, cwd, ok=True, timeout=600, **env):
    """Run ``python args`` with one thread (2 shared cores) in ``cwd``."""
    out = subprocess.run(
        [sys.executable, *args], cwd=str(cwd), capture_output=True, text=True,
        timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS='1', **env))
    log = out.stdout + out.stderr
    if ok:
        assert out.returncode == 0, log[-4000:]
    return out.returncode, log


def scalars(work_dir):
    """The entries of the run's ``vis_data/scalars.json`` (one run only)."""
    files = [osp.join(work_dir, d, 'vis_data', 'scalars.json')
             for d in sorted(os.listdir(work_dir))
             if osp.isfile(osp.join(work_dir, d, 'vis_data', 'scalars.json'))]
    assert len(files) == 1, files
    with open(files[0]) as f:
        return [json.loads(line) for line in f]


def train_entries(work_dir):
    return [e for e in scalars(work_dir) if 'loss_total' in e]


def accuracy(log, mode):
    """Every ``accuracy/top1`` of the ``Epoch(<mode>)`` lines of a log."""
    found = re.findall(rf'Epoch\({mode}\).*accuracy/top1: ([0-9.]+)', log)
    assert found, f'no Epoch({mode}) accuracy in the log'
    return [float(a) for a in found]


def checkpoint(path):
    import torch
    return torch.load(path, map_location='cpu', weights_only=True)


def supernet_of(config):
    """The backbone the config builds (the supernet)."""
    from mmengine.config import Config

    from atomnas_mm.models import AtomNAS
    kwargs = Config.fromfile(config).model.backbone.to_dict()
    kwargs.pop('type')
    return AtomNAS(**kwargs)


@pytest.fixture(scope='module')
def search(tmp_path_factory):
    """The search: work_dir with epoch_1.pth, epoch_2.pth and its log."""
    root = tmp_path_factory.mktemp('search')
    config = root / 'search.py'
    config.write_text(SEARCH.format(demo=DEMO, cache=str(root / 'data')))
    work_dir = root / 'work'
    _, log = run([osp.join(ROOT, 'tools', 'train.py'), str(config),
                  '--work-dir', str(work_dir)], root)
    return dict(root=root, config=str(config), work_dir=str(work_dir),
                log=log)


def test_search_shrinks_mid_run_and_logs_what_it_does(search):
    from atomnas_mm.models import AtomNAS
    from atomnas_mm.models.flops_count import count_flops_params
    log = search['log']
    shrinks = re.findall(r'AtomShrinkHook: removed \d+ atoms .* in epoch '
                         r'\d+, after iter (\d+)', log)
    assert len(shrinks) >= 2 and int(shrinks[0]) <= 8, shrinks  # in epoch 1

    # Point 5: every name in the log line and in the scalars file.
    line = re.findall(r'Epoch\(train\) \[2\]\[8/8\].*', log)[0]
    for key in LOG_KEYS:
        assert f' {key}: ' in line, key
    entries = train_entries(search['work_dir'])
    assert len(entries) == 16
    for e in entries:
        assert set(LOG_KEYS) <= set(e), set(LOG_KEYS) - set(e)
        # loss_total is what is back-propagated: the model's loss + terms.
        assert e['loss_total'] == pytest.approx(
            e['loss'] + e['loss_penalty'] + e['loss_wd'], rel=1e-5)
        assert e['loss_penalty'] == pytest.approx(
            e['penalty_rho'] * e['penalty_l1'], rel=1e-5)

    # backbone_flops / params: the backbone's own count, before and after.
    with open(osp.join(search['work_dir'], 'searched_arch.json')) as f:
        arch = json.load(f)['backbone']
    first, last = entries[0], entries[-1]
    supernet = count_flops_params(supernet_of(search['config']),
                                  (1, 1, 28, 28))
    assert (first['backbone_flops'], first['backbone_params']) == supernet
    searched = count_flops_params(AtomNAS(arch=arch), (1, 1, 28, 28))
    assert (last['backbone_flops'], last['backbone_params']) == searched
    assert searched[0] < 0.9 * supernet[0]
    print(f'\nbackbone FLOPs {supernet[0]} -> {searched[0]}, params '
          f'{supernet[1]} -> {searched[1]}; shrinks after iters {shrinks}')


def test_both_test_tools_on_shrunk_checkpoints(search):
    """This project's and mmpretrain's tools/test.py, unedited config: the
    mid-search and the final checkpoint give the validation accuracy."""
    import mmpretrain
    val = accuracy(search['log'], 'val')
    assert len(val) == 2
    tools = {1: osp.join(ROOT, 'tools', 'test.py'),
             2: osp.join(osp.dirname(mmpretrain.__file__), '.mim', 'tools',
                         'test.py')}
    for epoch, tool in tools.items():
        ckpt = osp.join(search['work_dir'], f'epoch_{epoch}.pth')
        rows = checkpoint(ckpt)['meta']['atomnas_arch']['backbone']['rows']
        assert rows != supernet_of(search['config']).arch_rows()  # shrunk
        _, log = run([tool, search['config'], ckpt, '--work-dir',
                      str(search['root'] / f'test_{epoch}')], search['root'])
        assert 'AtomShrinkHook: model reshaped' in log
        assert accuracy(log, 'test') == [val[epoch - 1]], tool
        print(f'\n{tool}: epoch {epoch} top-1 {val[epoch - 1]}')


def test_get_model_feature_extractor_inference_model(search):
    import cv2
    import numpy as np
    root = search['root']
    image = str(root / 'image.png')
    cv2.imwrite(image, np.random.default_rng(0).integers(
        0, 255, (28, 28), dtype=np.uint8))
    (root / 'model-index.yml').write_text(INDEX)
    (root / 'infer.py').write_text(INFER)
    ckpt = osp.join(search['work_dir'], 'epoch_2.pth')
    _, log = run([str(root / 'infer.py'), search['config'], ckpt,
                  str(root / 'model-index.yml'), image, str(root)], root)
    out = json.loads(re.findall(r'RESULT (.*)$', log, re.M)[-1])
    assert out['rows'] == checkpoint(ckpt)['meta']['atomnas_arch'][
        'backbone']['rows']
    assert out['feats'] == [[256]]  # the neck's output
    assert out['inference'] == pytest.approx(out['scores'], abs=1e-6)
    assert out['label'] == int(np.argmax(out['scores']))


def test_resume_repeats_the_uninterrupted_run(search, tmp_path):
    """paramwise_cfg (one param group per tensor, some emptied by shrinks):
    resuming from the shrunk epoch_1.pth repeats epoch 2 exactly."""
    import torch
    ckpt = checkpoint(osp.join(search['work_dir'], 'epoch_1.pth'))
    groups = ckpt['optimizer']['param_groups']
    assert len(groups) == len(list(supernet_of(search['config']).parameters()
                                   )) + 2  # one per tensor (+ fc weight, bias)
    assert any(not g['params'] for g in groups)  # removed tensors' groups
    assert {g['weight_decay'] for g in groups} == {0.0, 1e-4}

    work_dir = str(tmp_path / 'resumed')
    _, log = run([osp.join(ROOT, 'tools', 'train.py'), search['config'],
                  '--work-dir', work_dir, '--resume',
                  osp.join(search['work_dir'], 'epoch_1.pth')], tmp_path)
    assert 'resumed epoch: 1' in log
    assert 'AtomShrinkHook: removed' in log  # shrinks after the resume too
    resumed = train_entries(work_dir)
    full = train_entries(search['work_dir'])[8:]
    assert len(resumed) == len(full) == 8
    for a, b in zip(resumed, full):
        for key in ('loss', 'loss_total', 'penalty_l1', 'lr',
                    'backbone_flops'):
            assert a[key] == b[key], (key, a['step'], a[key], b[key])
    assert accuracy(log, 'val') == accuracy(search['log'], 'val')[1:]
    end = checkpoint(osp.join(work_dir, 'epoch_2.pth'))
    ref = checkpoint(osp.join(search['work_dir'], 'epoch_2.pth'))
    assert end['meta']['atomnas_arch'] == ref['meta']['atomnas_arch']
    for key, value in ref['state_dict'].items():
        assert torch.equal(end['state_dict'][key], value), key


def test_several_optimizers_stop_in_before_train(search, tmp_path):
    (tmp_path / 'two_optimizers.py').write_text(TWO_OPTIMIZERS)
    config = tmp_path / 'two.py'
    config.write_text(textwrap.dedent(f'''
        _base_ = {search['config']!r}
        custom_imports = dict(imports=['atomnas_mm', 'two_optimizers'])
        optim_wrapper = dict(
            _delete_=True, constructor='BackboneAndRest',
            backbone=dict(optimizer=dict(type='SGD', lr=0.1)),
            head=dict(optimizer=dict(type='SGD', lr=0.1)))
        param_scheduler = []
        '''))
    rc, log = run([osp.join(ROOT, 'tools', 'train.py'), str(config),
                   '--work-dir', str(tmp_path / 'work')], tmp_path,
                  ok=False, PYTHONPATH=str(tmp_path))
    assert rc != 0
    assert ('AtomShrinkHook supports a single OptimWrapper, got '
            'OptimWrapperDict (several optimizers)') in log, log[-3000:]
    assert 'before_train' in log and 'Epoch(train)' not in log
