"""tools/export_searched.py: a tiny search, export, re-test the export."""
import importlib.util
import json
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner
from mmpretrain.registry import MODELS

import atomnas_mm  # noqa: F401

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# The tiny search of test_shrink_hook: its arch, data and atom schedule.
from test_shrink_hook import SCHEDULE, KillAtomsHook, make_cfg  # noqa: E402


def load_tool(name):
    path = osp.join(REPO, 'tools', f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'_tool_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.fixture(scope='module')
def search(tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp('search') / 'tiny_search')
    # With EMA, shrink and BN re-calibration (before the checkpoint is written).
    runner = Runner.from_cfg(make_cfg(work_dir, max_epochs=2))
    val = ValMetricsHook()
    runner.register_hook(KillAtomsHook(SCHEDULE))
    runner.register_hook(val)
    runner.train()
    ema = [h for h in runner.hooks if type(h).__name__ == 'EMAHook'][0]
    return dict(work_dir=work_dir, runner=runner, val=val.metrics[-1],
                ema_model=ema.ema_model.module)


def test_export_and_retest(search, tmp_path):
    runner = search['runner']
    rows = runner.model.backbone.arch_rows()
    assert rows[1][3:5] == [[3, 7], [6, 6]]    # the search did shrink
    assert rows[2][3:5] == [[], []]

    out = str(tmp_path / 'export')
    paths = load_tool('export_searched').main([search['work_dir'],
                                               '--out', out])
    assert osp.basename(paths['config']) == 'tiny_search.py'

    with open(paths['arch']) as f:
        arch = json.load(f)
    assert arch['rows'] == rows
    assert (arch['stem_channels'], arch['last_channels']) == (8, 32)

    ckpt = torch.load(paths['checkpoint'], weights_only=True)
    assert set(ckpt) == {'state_dict', 'meta'}
    assert ckpt['meta']['atomnas_arch']['backbone']['rows'] == rows

    text = open(paths['config']).read()
    assert 'AtomShrinkHook' not in text and 'BNL1PenaltyHook' not in text
    cfg = Config.fromfile(paths['config'])
    assert cfg.model.backbone.arch.rows == rows

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

    # tools/test.py on the exported config + checkpoint reproduces the
    # search's final validation.
    metrics = load_tool('test').main([
        paths['config'], paths['checkpoint'],
        '--work-dir', str(tmp_path / 'test')])
    assert metrics['accuracy/top1'] == pytest.approx(
        search['val']['accuracy/top1'])


def test_export_inherit_and_errors(search, tmp_path):
    tool = load_tool('export_searched')
    ckpt = osp.join(search['work_dir'], 'epoch_2.pth')
    retrain = osp.join(REPO, 'configs', 'retrain', 'atomnas-a_in1k.py')
    paths = tool.main([ckpt, '--out', str(tmp_path), '--name', 'net',
                       '--inherit', retrain])
    cfg = Config.fromfile(paths['config'])
    rows = search['runner'].model.backbone.arch_rows()
    assert cfg.model.backbone.arch['rows'] == rows
    assert cfg.model.head.num_classes == 1000           # from the base
    assert cfg.train_cfg.max_epochs == 350

    with pytest.raises(FileNotFoundError, match='does not exist'):
        tool.main([str(tmp_path / 'nowhere'), '--out', str(tmp_path)])
    plain = str(tmp_path / 'plain.pth')
    torch.save(dict(state_dict={}, meta={}), plain)
    with pytest.raises(ValueError, match='atomnas_arch'):
        tool.main([plain, '--out', str(tmp_path)])


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
