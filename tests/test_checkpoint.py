"""Runner checkpoints of AtomNAS load with ``torch.load(weights_only=True)``.

Nothing here turns weights_only off: torch >= 2.6 loads with it by default,
and mmengine's loaders call ``torch.load`` without the argument.
"""
import copy
import copyreg
import io
import os.path as osp
import pickle
import pickletools
import zipfile
from collections import OrderedDict

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.registry import DefaultScope
from mmengine.runner import Runner, load_checkpoint
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample
from torch.utils.data import Dataset

import atomnas_mm.checkpoint  # noqa: F401  (the allowlist under test)

# Globals a checkpoint may name: torch's tensors, the message hub's
# HistoryBuffer and numpy arrays/scalars. No callables beyond these.
EXPECTED_GLOBALS = {
    'collections OrderedDict', 'torch._utils _rebuild_tensor_v2',
    'torch FloatStorage', 'torch LongStorage',
    'mmengine.logging.history_buffer HistoryBuffer',
    'numpy._core.multiarray _reconstruct', 'numpy ndarray', 'numpy dtype',
    'numpy._core.multiarray scalar', '_codecs encode'}


class ToyImages(Dataset):
    """Four random 32 px images of two classes."""

    metainfo = dict(classes=('a', 'b'))

    def __len__(self):
        return 4

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8,
                              generator=generator)
        return dict(inputs=image,
                    data_samples=DataSample().set_gt_label(index % 2))


class RecordHook(Hook):
    """Record the model state and iteration when training starts and ends."""

    def before_train(self, runner):
        self.start_iter = runner.iter
        self.start = copy.deepcopy(runner.model.state_dict())

    def after_train(self, runner):
        self.end = copy.deepcopy(runner.model.state_dict())


def model_cfg(arch):
    return dict(
        type='ImageClassifier',
        data_preprocessor=dict(type='ClsDataPreprocessor', num_classes=2,
                               mean=[127.5] * 3, std=[127.5] * 3),
        backbone=dict(type='atomnas_mm.AtomNAS', arch=arch),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=2, in_channels=32))


def runner_cfg(arch, work_dir, name, max_iters, **kwargs):
    return dict(
        model=model_cfg(arch), work_dir=work_dir, experiment_name=name,
        train_dataloader=dict(
            dataset=ToyImages(), batch_size=2, num_workers=0,
            sampler=dict(type='DefaultSampler', shuffle=False)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(
            optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        param_scheduler=[dict(type='LinearLR', start_factor=0.5,
                              by_epoch=False, begin=0, end=4)],
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=2,
                            by_epoch=False),
            logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[dict(type='EMAHook')],
        randomness=dict(seed=0), default_scope='mmpretrain', **kwargs)


def train(cfg):
    """Train a Runner built from ``cfg``; return it and its RecordHook."""
    runner = Runner(**cfg)
    record = RecordHook()
    runner.register_hook(record)
    runner.train()
    return runner, record


def assert_state_equal(state, expected):
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def assert_state_differs(state, expected):
    assert any(not torch.equal(state[k], v) for k, v in expected.items()
               if v.is_floating_point())


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_arch):
    """A 2-iteration run with EMA; returns its RecordHook and checkpoint."""
    work_dir = str(tmp_path_factory.mktemp('atomnas_ckpt'))
    cfg = runner_cfg(tiny_arch, work_dir, 'first', max_iters=2)
    runner, record = train(cfg)
    path = osp.join(work_dir, 'iter_2.pth')
    assert osp.isfile(path)
    losses = runner.message_hub.get_scalar('train/loss').data[0].tolist()
    return dict(record=record, path=path, cfg=cfg, losses=losses)


def pickle_globals(path):
    """The GLOBAL names that the checkpoint's pickle refers to."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith('data.pkl'))
        data = archive.read(name)
    return {arg for op, arg, _ in pickletools.genops(data)
            if op.name == 'GLOBAL'}


def test_checkpoint_holds_only_data(trained):
    names = pickle_globals(trained['path'])
    assert '__builtin__ getattr' not in names
    assert names <= EXPECTED_GLOBALS


def test_torch_load_weights_only(trained):
    checkpoint = torch.load(trained['path'], weights_only=True)
    assert {'meta', 'state_dict', 'message_hub', 'optimizer',
            'param_schedulers', 'ema_state_dict'} <= set(checkpoint)
    buffer = checkpoint['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer)
    assert buffer.data[0].tolist() == trained['losses']
    assert buffer.mean() == pytest.approx(sum(trained['losses']) / 2)
    assert checkpoint['meta']['iter'] == 2


def test_load_from(trained, tmp_path):
    checkpoint = torch.load(trained['path'], weights_only=True)
    cfg = dict(trained['cfg'], work_dir=str(tmp_path),
               experiment_name='load_from', load_from=trained['path'])
    _, record = train(cfg)
    assert record.start_iter == 0
    # The saved state_dict holds the EMA weights (mmengine's EMAHook swaps).
    assert_state_equal(record.start, checkpoint['state_dict'])


def test_resume(trained, tmp_path):
    cfg = dict(trained['cfg'], work_dir=str(tmp_path), experiment_name='resume',
               load_from=trained['path'], resume=True,
               train_cfg=dict(by_epoch=False, max_iters=3))
    runner, record = train(cfg)
    assert record.start_iter == 2 and runner.iter == 3
    assert_state_equal(record.start, trained['record'].end)
    losses = runner.message_hub.get_scalar('train/loss').data[0].tolist()
    assert losses[:2] == trained['losses'] and len(losses) == 3
    scheduler = runner.param_schedulers[0]
    assert scheduler.last_step == 3
    momentum = runner.optim_wrapper.optimizer.state_dict()['state']
    assert momentum and all('momentum_buffer' in s for s in momentum.values())
    assert osp.isfile(osp.join(str(tmp_path), 'iter_3.pth'))
    assert not osp.isfile(osp.join(str(tmp_path), 'iter_2.pth'))


def test_test_time_loading(trained, tmp_path, tiny_arch):
    expected = torch.load(trained['path'], weights_only=True)['state_dict']
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(model_cfg(tiny_arch))
    assert_state_differs(model.state_dict(), expected)
    load_checkpoint(model, trained['path'], strict=True)
    assert_state_equal(model.state_dict(), expected)

    runner = Runner(model=model_cfg(tiny_arch), work_dir=str(tmp_path),
                    experiment_name='test_time', default_scope='mmpretrain')
    assert_state_differs(runner.model.state_dict(), expected)
    runner.load_checkpoint(trained['path'])
    assert_state_equal(runner.model.state_dict(), expected)


def save_as_stock_mmengine(obj):
    """Pickle ``obj`` as mmengine does without atomnas_mm's reducer."""
    reducer = copyreg.dispatch_table.pop(HistoryBuffer)
    try:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
    finally:
        copyreg.pickle(HistoryBuffer, reducer)
    buffer.seek(0)
    return buffer


def test_stock_mmengine_history_buffer_loads():
    history = HistoryBuffer([1.0, 3.0], [1, 1])
    buffer = save_as_stock_mmengine(dict(loss=history))
    assert b'getattr' in buffer.getvalue()
    loaded = torch.load(buffer, weights_only=True)['loss']
    assert loaded.mean() == 2.0 and loaded.statistics('max') == 3.0


class GetAttr:
    """Pickles as ``getattr(obj, name)``."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __reduce__(self):
        return getattr, (self.obj, self.name)


@pytest.mark.parametrize('obj, name', [
    (HistoryBuffer, '__init__'), (HistoryBuffer, 'update'),
    (OrderedDict, 'fromkeys')])
def test_other_getattr_is_rejected(obj, name):
    buffer = io.BytesIO()
    torch.save(dict(x=GetAttr(obj, name)), buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError, match=f'getattr.*{name}'):
        torch.load(buffer, weights_only=True)


def test_history_buffer_deepcopy_keeps_data():
    history = HistoryBuffer([1.0, 2.0], [1, 1])
    copied = copy.deepcopy(history)
    assert copied.data[0].tolist() == [1.0, 2.0] and copied.max() == 2.0
    assert 'statistics_methods' not in vars(copied)
