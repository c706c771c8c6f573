"""atomnas_mm.export (tools/export_searched.py): a tiny search, export,
re-test the export with tools/test.py; the 1-channel demo net's arch."""
import copy
import hashlib
import json
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import init_default_scope
from mmpretrain.registry import MODELS

import atomnas_mm  # noqa: F401
from atomnas_mm.export import (backbone_path, complete_archs, export,
                               inject_archs, input_channels, input_size,
                               strip_search)
from atomnas_mm.models import AtomNAS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TESTS = osp.dirname(osp.abspath(__file__))
DEMO = osp.join(REPO, 'configs', 'demo', 'atomnas_fashion_mnist.py')
# The tiny search of test_shrink_hook: its arch, data and atom schedule.
from harness import SCHEDULE, KillAtomsHook, build, make_cfg  # noqa: E402

# A searched-looking 1-channel demo net (narrower than the demo supernet).
DEMO_ROWS = [[16, 1, 1, [3], [16], False], [24, 1, 2, [3, 7], [20, 5], True],
             [24, 1, 1, [5], [9], True],
             [40, 1, 2, [3, 5, 7], [30, 12, 4], True],
             [40, 1, 1, [3], [4], True], [64, 1, 1, [3, 5], [50, 20], True]]


class ValMetricsHook(Hook):
    def __init__(self):
        self.metrics = []

    def after_val_epoch(self, runner, metrics=None):
        self.metrics.append(dict(metrics))


@torch.no_grad()
def logits(model, data):
    model.eval()
    batch = model.data_preprocessor(data, False)
    return model(batch['inputs'], mode='tensor')


def snapshot(folder, skip=()):
    """``{relative path: sha1}`` of every file under ``folder``."""
    found = {}
    for root, dirs, files in os.walk(folder):
        rel_root = osp.relpath(root, folder)
        dirs[:] = [d for d in dirs if osp.normpath(osp.join(rel_root, d))
                   not in skip]
        for name in files:
            path = osp.join(root, name)
            with open(path, 'rb') as f:
                found[osp.relpath(path, folder)] = hashlib.sha1(
                    f.read()).hexdigest()
    return found


def run_tool(args, cwd, env=None):
    out = subprocess.run([sys.executable] + args, cwd=str(cwd), env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out.stdout + out.stderr


@pytest.fixture(scope='module')
def search(tmp_path_factory):
    root = tmp_path_factory.mktemp('search')
    work_dir = str(root / 'work_dirs' / 'tiny_search')
    # With EMA, shrink and BN re-calibration (before the checkpoint is written).
    val = ValMetricsHook()
    runner = build(make_cfg(work_dir, max_epochs=2,
                            experiment_name='tiny_search'),
                   [KillAtomsHook(SCHEDULE), val])
    runner.train()
    ema = [h for h in runner.hooks if type(h).__name__ == 'EMAHook'][0]
    return dict(root=root, work_dir=work_dir, runner=runner,
                val=val.metrics[-1], ema_model=ema.ema_model.module)


def test_export_matches_the_ema_model(search, tmp_path):
    runner = search['runner']
    rows = runner.model.backbone.arch_rows()
    assert rows[1][3:5] == [[3, 7], [6, 6]]    # the search did shrink
    paths = export(search['work_dir'], str(tmp_path / 'export'))
    assert osp.basename(paths['config']) == 'tiny_search.py'

    with open(paths['arch']) as f:
        arch = json.load(f)
    assert arch == runner.model.backbone.arch_dict()
    ckpt = torch.load(paths['checkpoint'], weights_only=True)
    assert set(ckpt) == {'state_dict', 'meta'}
    assert ckpt['meta']['atomnas_arch']['backbone']['rows'] == rows

    text = open(paths['config']).read()
    assert 'AtomShrinkHook' not in text and 'BNL1PenaltyHook' not in text
    # (the tiny search's penalty hook has no weight decay to keep)
    cfg = Config.fromfile(paths['config'])
    assert cfg.model.backbone.arch.rows == rows
    assert cfg.input_size == 32                 # the hook's, kept for tools

    # The exported model computes exactly what the search's EMA model does
    # (and not what the live model does).
    model = MODELS.build(cfg.model)
    model.load_state_dict(ckpt['state_dict'])
    data = runner.val_dataloader.collate_fn(
        [runner.val_dataloader.dataset[i] for i in range(8)])
    expected = logits(search['ema_model'], data)
    torch.testing.assert_close(logits(model, data), expected, rtol=0,
                               atol=1e-6)
    assert not torch.allclose(logits(runner.model, data), expected)


@pytest.mark.slow
def test_cli_export_and_test_leave_the_search_work_dir_alone(search):
    """tools/export_searched.py, then tools/test.py on the export with the
    default work_dir (work_dirs/<config name>, the search's own): the
    search's files stay as they were, the test run has its own folder."""
    root, work_dir = search['root'], search['work_dir']
    # What mmengine dumps for a config file of the search's name.
    Config(make_cfg(work_dir)).dump(osp.join(work_dir, 'tiny_search.py'))
    before = snapshot(work_dir)
    # The tiny search's toy dataset: registered by tests/toy_imports.py.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [TESTS, os.environ.get('PYTHONPATH', '')]))
    log = run_tool([osp.join(REPO, 'tools', 'export_searched.py'),
                    'work_dirs/tiny_search', '--out', 'export'], root, env)
    assert 'config: export/tiny_search.py' in log
    # The export plus the import of the toy dataset, under the same name.
    (root / 'with_toy_data').mkdir()
    (root / 'with_toy_data' / 'tiny_search.py').write_text(
        "_base_ = ['../export/tiny_search.py']\n"
        "custom_imports = dict(imports=['atomnas_mm', 'toy_imports'])\n")
    run_tool([osp.join(REPO, 'tools', 'test.py'),
              'with_toy_data/tiny_search.py', 'export/tiny_search.pth',
              '--out', 'metrics.json', '--out-item', 'metrics'], root, env)
    assert snapshot(work_dir, skip={'test'}) == before
    assert osp.isfile(osp.join(work_dir, 'test', 'tiny_search.py'))
    # ... and reproduces the search's final validation.
    with open(root / 'metrics.json') as f:
        metrics = json.load(f)
    assert metrics['accuracy/top1'] == pytest.approx(
        search['val']['accuracy/top1'])


def test_export_inherit_and_errors(search, tmp_path):
    ckpt = osp.join(search['work_dir'], 'epoch_2.pth')
    retrain = osp.join(REPO, 'configs', 'retrain', 'atomnas-a_in1k.py')
    paths = export(ckpt, str(tmp_path), name='net', inherit=retrain)
    cfg = Config.fromfile(paths['config'])
    rows = search['runner'].model.backbone.arch_rows()
    assert cfg.model.backbone.arch['rows'] == rows
    assert cfg.model.head.num_classes == 1000           # from the base
    assert cfg.train_cfg.max_epochs == 350
    assert cfg.input_size == 32

    with pytest.raises(FileNotFoundError, match='does not exist'):
        export(str(tmp_path / 'nowhere'), str(tmp_path))
    plain = str(tmp_path / 'plain.pth')
    torch.save(dict(state_dict={}, meta={}), plain)
    with pytest.raises(ValueError, match='atomnas_arch'):
        export(plain, str(tmp_path))


def demo_checkpoint(path, drop=()):
    """A search-like checkpoint of the demo: a narrower 1-channel net, the
    demo config in ``meta['cfg']``, its arch (minus ``drop``) in meta."""
    cfg = Config.fromfile(DEMO)
    init_default_scope('mmpretrain')
    model_cfg = copy.deepcopy(cfg.model)
    supernet = model_cfg.backbone.arch
    model_cfg.backbone.arch = dict(rows=DEMO_ROWS, **{
        k: v for k, v in supernet.items() if k not in ('rows', 'stages')})
    model = MODELS.build(model_cfg)
    arch = model.backbone.arch_dict()
    for key in drop:
        arch.pop(key)
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(atomnas_arch=dict(backbone=arch),
                              cfg=cfg.pretty_text)), path)
    return model


@pytest.mark.parametrize('drop', [(), ('in_channels', )],
                         ids=['complete', 'old-checkpoint'])
def test_arch_json_rebuilds_the_1_channel_demo_net(tmp_path, drop):
    """``AtomNAS(arch=json.load(...))`` is the searched net, input included;
    a checkpoint without ``in_channels`` takes it from its search config."""
    model = demo_checkpoint(str(tmp_path / 'ck.pth'), drop)
    paths = export(str(tmp_path / 'ck.pth'), str(tmp_path / 'out'))
    with open(paths['arch']) as f:
        rebuilt = AtomNAS(arch=json.load(f))
    assert rebuilt.in_channels == 1
    shapes = {k: v.shape for k, v in rebuilt.state_dict().items()}
    assert shapes == {k[len('backbone.'):]: v.shape
                      for k, v in model.state_dict().items()
                      if k.startswith('backbone.')}
    cfg = Config.fromfile(paths['config'])
    assert input_size(cfg) == (28, 28)
    exported = MODELS.build(cfg.model)
    assert input_channels(exported) == 1
    exported.load_state_dict(torch.load(paths['checkpoint'],
                                        weights_only=True)['state_dict'])


def test_export_is_named_after_the_search_config(tmp_path):
    """A work_dir named otherwise (``--work-dir run7``): the files take the
    config's name the run was started with (mmengine's experiment_name),
    ``--config``'s when given, ``--name`` over both."""
    work_dir = tmp_path / 'run7'
    work_dir.mkdir()
    ckpt = str(work_dir / 'epoch_1.pth')
    demo_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    saved['meta']['experiment_name'] = 'atomnas_fashion_mnist_20261206_101500'
    torch.save(saved, ckpt)
    (work_dir / 'last_checkpoint').write_text(ckpt)
    out = str(tmp_path / 'out')
    assert osp.basename(export(str(work_dir), out)['config']) == \
        'atomnas_fashion_mnist.py'
    assert osp.basename(export(ckpt, out, config=DEMO)['checkpoint']) == \
        osp.basename(DEMO)[:-3] + '.pth'
    assert osp.basename(export(ckpt, out, name='net')['config']) == 'net.py'
    saved['meta']['experiment_name'] = '20261206_101500'  # a Runner of dicts
    torch.save(saved, ckpt)
    assert osp.basename(export(ckpt, out)['config']) == 'run7.py'


@pytest.fixture(scope='module')
def demo_export(tmp_path_factory):
    """The exported 1-channel demo-like net: ``{'model', 'paths'}``."""
    tmp = tmp_path_factory.mktemp('demo_export')
    model = demo_checkpoint(str(tmp / 'ck.pth'))
    return dict(model=model, root=tmp,
                paths=export(str(tmp / 'ck.pth'), str(tmp / 'export'),
                             name='demo'))


@pytest.mark.slow
def test_get_flops_on_the_exported_1_channel_net(demo_export):
    """Default shape: the config's 28 px, the model's 1 channel."""
    from atomnas_mm.models import count_flops_params
    log = run_tool([osp.join(REPO, 'tools', 'analysis_tools', 'get_flops.py'),
                    demo_export['paths']['config']], demo_export['root'])
    assert 'Input shape: (1, 1, 28, 28)' in log
    flops, _ = count_flops_params(demo_export['model'], (1, 1, 28, 28))
    line = next(x for x in log.splitlines() if x.startswith('AtomNAS (MAdds'))
    assert line.split()[-2] == f'{flops / 1e6:.2f}', line


@pytest.mark.slow
@pytest.mark.skipif(not all(osp.isdir(osp.join(
    osp.dirname(osp.dirname(osp.abspath(torch.__file__))), p))
    for p in ('onnx', 'onnxruntime')), reason='needs onnx and onnxruntime')
def test_onnx_verify_on_the_exported_1_channel_net(demo_export):
    paths = demo_export['paths']
    log = run_tool([osp.join(REPO, 'tools', 'deployment', 'pytorch2onnx.py'),
                    paths['config'], paths['checkpoint'], '--out',
                    'demo.onnx', '--verify'], demo_export['root'])
    assert 'demo.onnx: input [batch, 1, 28, 28]' in log
    line = next(x for x in log.splitlines() if x.startswith('max |onnx'))
    errors = re.findall(r'batch \d+: (\S+?)(?:,|$)', line)
    assert len(errors) == 2 and max(map(float, errors)) < 1e-4, line


@pytest.mark.parametrize('key', ['rows', 'stem_channels'])
def test_export_names_a_missing_arch_key(tmp_path, key):
    demo_checkpoint(str(tmp_path / 'ck.pth'), drop=(key, ))
    # A search config that does not state the stem width either.
    config = tmp_path / 'search.py'
    config.write_text(f'_base_ = [{DEMO!r}]\n'
                      "model = dict(backbone=dict(arch='supernet'))\n")
    with pytest.raises(ValueError, match=f"has no '{key}'"):
        export(str(tmp_path / 'ck.pth'), str(tmp_path / 'out'),
               config=str(config))


def test_inject_archs_drops_what_the_arch_carries():
    model_cfg = dict(backbone=dict(type='atomnas_mm.AtomNAS', arch='supernet',
                                   stem_channels=16, in_channels=1,
                                   out_indices=(1, 2)))
    arch = dict(rows=DEMO_ROWS, stem_channels=16, in_channels=1)
    inject_archs(model_cfg, {'backbone': arch})
    assert model_cfg['backbone'] == dict(type='atomnas_mm.AtomNAS',
                                         arch=arch, out_indices=(1, 2))
    with pytest.raises(KeyError, match="model has no 'neck'"):
        inject_archs(model_cfg, {'neck.inner': arch})
    assert backbone_path({'backbone': arch}, 'x') == 'backbone'
    # Completion from the config: only keys the arch lacks.
    done = complete_archs({'backbone': dict(rows=DEMO_ROWS)},
                          dict(backbone=dict(stem_channels=16,
                                             in_channels=1)), 'x')
    assert done['backbone'] == dict(rows=DEMO_ROWS, stem_channels=16,
                                    in_channels=1)


def test_model_index_registered():
    """mmpretrain's get_model/list_models find the AtomNAS configs."""
    import mmpretrain
    from atomnas_mm.apis import find_model_index, register_model_index
    path = find_model_index()
    if path is None:
        pytest.skip('no model-index.yml in this checkout/install')
    assert register_model_index() == path
    assert register_model_index() == path          # idempotent
    names = mmpretrain.list_models('atomnas*')
    assert 'atomnas-a_in1k' in names
    assert 'resnet50_8xb32_in1k' in mmpretrain.list_models('resnet50*')
    model = mmpretrain.get_model('atomnas-a_in1k')
    assert type(model.backbone).__name__ == 'AtomNAS'
    assert model.backbone.arch_rows()[1][4] == [16, 12, 9]


def test_strip_search_keeps_the_recipe_weight_decay():
    """The demo's weight decay (4e-5) lives in BNL1PenaltyHook: the retrain
    config keeps it as ``rho=0``; the shrink hook and a decay-free penalty
    hook go."""
    cfg = Config.fromfile(DEMO)
    cfg.custom_hooks.append(dict(type='atomnas_mm.BNL1PenaltyHook', rho=1e-3))
    arch = AtomNAS(arch=cfg.model.backbone.arch, in_channels=1).arch_dict()
    strip_search(cfg, {'backbone': arch})
    kinds = [h['type'] for h in cfg.custom_hooks]
    assert kinds == ['EMAHook', 'atomnas_mm.BNL1PenaltyHook',
                     'atomnas_mm.BNRecalibrationHook']
    assert cfg.custom_hooks[1] == dict(type='atomnas_mm.BNL1PenaltyHook',
                                       rho=0, weight_decay=4e-5)
