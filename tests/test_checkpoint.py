"""Runner checkpoints of AtomNAS load with ``torch.load(weights_only=True)``.

Nothing here turns weights_only off: torch >= 2.6 loads with it by default,
and atomnas_mm's local loader passes ``weights_only=True``. Damaged files
raise an error naming them; checkpoints that do not fit a model with an
AtomNAS backbone raise an error naming the keys.
"""
import copy
import copyreg
import io
import os
import os.path as osp
import pickle
import pickletools
import subprocess
import sys
import zipfile
from collections import OrderedDict

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint
from mmpretrain.registry import MODELS

import atomnas_mm.checkpoint  # noqa: F401  (the allowlist under test)
from atomnas_mm.checkpoint import (CheckpointMismatchError,
                                   UnreadableCheckpointError)
from atomnas_mm.datasets import DEBIAN_ROOT
from harness import build, toy_classifier, toy_loader

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

# Globals a checkpoint may name: torch's tensors, the message hub's
# HistoryBuffer and numpy arrays/scalars. No callables beyond these.
EXPECTED_GLOBALS = {
    'collections OrderedDict', 'torch._utils _rebuild_tensor_v2',
    'torch FloatStorage', 'torch LongStorage',
    'mmengine.logging.history_buffer HistoryBuffer',
    'numpy._core.multiarray _reconstruct', 'numpy ndarray', 'numpy dtype',
    'numpy._core.multiarray scalar', '_codecs encode'}


class RecordHook(Hook):
    """Record the model state and iteration when training starts and ends."""

    def before_train(self, runner):
        self.start_iter = runner.iter
        self.start = copy.deepcopy(runner.model.state_dict())

    def after_train(self, runner):
        self.end = copy.deepcopy(runner.model.state_dict())


def model_cfg(arch, num_classes=2, **backbone):
    return toy_classifier(arch, num_classes=num_classes, **backbone)


def build_model(cfg):
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg)


def runner_cfg(arch, work_dir, name, max_iters, **kwargs):
    return dict(
        model=model_cfg(arch), work_dir=work_dir, experiment_name=name,
        train_dataloader=toy_loader(n=4, num_classes=2, batch_size=2,
                                    shuffle=False),
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
    record = RecordHook()
    runner = build(cfg, [record])
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
    model = build_model(model_cfg(tiny_arch))
    assert_state_differs(model.state_dict(), expected)
    load_checkpoint(model, trained['path'], strict=True)
    assert_state_equal(model.state_dict(), expected)

    runner = build(dict(model=model_cfg(tiny_arch), work_dir=str(tmp_path),
                        default_scope='mmpretrain'))
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


# -- damaged files ------------------------------------------------------------
def record_offset(path, suffix):
    """Byte offset of the data of the zip record ending in ``suffix``."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist()
                    if i.filename.endswith(suffix))
    with open(path, 'rb') as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), 'little')
                               for _ in range(2))
    return info.header_offset + 30 + name_len + extra_len


def flipped(data, offset):
    data = bytearray(data)
    data[offset] ^= 0x10
    return bytes(data)


@pytest.fixture(scope='module')
def damaged(trained, tmp_path_factory):
    """Damaged copies of the trained checkpoint: {kind: path}."""
    folder = tmp_path_factory.mktemp('damaged')
    with open(trained['path'], 'rb') as f:
        data = f.read()
    weights = record_offset(trained['path'], 'data/0') + 5
    pickled = record_offset(trained['path'], 'data.pkl') + 40
    contents = dict(
        empty=b'', text='epoch 3, top-1 81.6 \u00e9\n'.encode('latin-1'),
        truncated=data[:len(data) // 2], truncated_end=data[:-10],
        flipped_weights=flipped(data, weights),
        flipped_pickle=flipped(data, pickled))
    paths = {}
    for kind, content in contents.items():
        paths[kind] = str(folder / f'{kind}.pth')
        with open(paths[kind], 'wb') as f:
            f.write(content)
    return paths


# flipped_weights: torch.load itself does not notice it (why the CRC check).
KINDS = ['empty', 'text', 'truncated', 'truncated_end', 'flipped_weights',
         'flipped_pickle']


def unreadable(path):
    return pytest.raises(UnreadableCheckpointError,
                         match=f'{path} is not a readable checkpoint')


@pytest.mark.parametrize('kind', KINDS)
def test_damaged_file_named_by_mmengine_loaders(damaged, kind, tiny_arch,
                                                tmp_path):
    path = damaged[kind]
    model = build_model(model_cfg(tiny_arch))
    with unreadable(path):
        load_checkpoint(model, path)
    runner = build(dict(model=model_cfg(tiny_arch), work_dir=str(tmp_path),
                        default_scope='mmpretrain'))
    with unreadable(path):
        runner.load_checkpoint(path)
    from mmpretrain import get_model
    with unreadable(path):
        get_model(Config(dict(model=model_cfg(tiny_arch))), pretrained=path)
    backbone = build_model(model_cfg(tiny_arch, init_cfg=dict(
        type='Pretrained', checkpoint=path, prefix='backbone.')))
    with unreadable(path):
        backbone.init_weights()


@pytest.mark.parametrize('resume', [False, True])
def test_damaged_file_named_by_load_from_and_resume(trained, damaged, tmp_path,
                                                    resume):
    path = damaged['truncated']
    cfg = dict(trained['cfg'], work_dir=str(tmp_path), load_from=path,
               resume=resume, experiment_name=f'damaged_resume_{resume}')
    with unreadable(path):
        train(cfg)


class Shell:
    """Pickles as a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


def test_code_in_checkpoint_is_refused(tmp_path, tiny_arch):
    path, marker = str(tmp_path / 'evil.pth'), tmp_path / 'ran'
    torch.save(dict(state_dict={}, meta=Shell(marker)), path)
    model = build_model(model_cfg(tiny_arch))
    with pytest.raises(pickle.UnpicklingError,
                       match=f'{path} is not a readable checkpoint: '
                       r'torch.load\(weights_only=True\) refuses'):
        load_checkpoint(model, path)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.skipif(not osp.isdir(DEBIAN_ROOT),
                    reason='needs the Debian package dataset-fashion-mnist')
def test_damaged_file_named_by_test_tool(damaged, tmp_path):
    """tools/test.py on the demo config stops with the file named."""
    path = damaged['flipped_pickle']
    out = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools/test.py'),
         osp.join(ROOT, 'configs/demo/atomnas_fashion_mnist.py'), path,
         '--work-dir', str(tmp_path / 'work'), '--cfg-options',
         f'test_dataloader.dataset.cache_dir={tmp_path / "data"}',
         'test_dataloader.dataset.indices=8', 'test_dataloader.num_workers=0',
         'test_dataloader.persistent_workers=False'],
        capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert out.returncode != 0
    assert f'{path} is not a readable checkpoint' in out.stderr, \
        out.stderr[-3000:]


# -- checkpoints that do not fit the model ------------------------------------
@pytest.fixture(scope='module')
def variants(trained, tmp_path_factory):
    """The trained checkpoint as a bare backbone state_dict, and whole."""
    folder = tmp_path_factory.mktemp('variants')
    state = torch.load(trained['path'], weights_only=True)['state_dict']
    bare = {k[len('backbone.'):]: v for k, v in state.items()
            if k.startswith('backbone.')}
    paths = dict(whole=trained['path'], bare=str(folder / 'bare.pth'))
    torch.save(dict(state_dict=bare), paths['bare'])
    return paths, state


def test_keys_without_backbone_prefix_raise(variants, tiny_arch):
    paths, _ = variants
    model = build_model(model_cfg(tiny_arch))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointMismatchError) as error:
        load_checkpoint(model, paths['bare'])
    message = str(error.value)
    assert 'backbone.conv1.conv.weight' in message  # a missing key
    assert 'conv1.conv.weight' in message.split('unexpected keys')[1]
    assert "lack the prefix 'backbone.'" in message
    assert_state_equal(model.state_dict(), before)  # nothing was loaded


def test_head_with_other_classes_raises(variants, tiny_arch, tmp_path):
    paths, _ = variants
    model = build_model(model_cfg(tiny_arch, num_classes=3))
    with pytest.raises(CheckpointMismatchError,
                       match=r'head\.fc\.weight: checkpoint \(2, 32\), '
                       r'model \(3, 32\).*prefix=.backbone\..'):
        load_checkpoint(model, paths['whole'])
    from mmpretrain import get_model
    with pytest.raises(CheckpointMismatchError, match='head.fc.bias'):
        get_model(Config(dict(model=model_cfg(tiny_arch, num_classes=3))),
                  pretrained=paths['whole'])


@pytest.mark.parametrize('ema', [False, True])
def test_load_from_of_other_head_raises(trained, tmp_path, tiny_arch, ema):
    cfg = dict(trained['cfg'], work_dir=str(tmp_path),
               model=model_cfg(tiny_arch, num_classes=3),
               load_from=trained['path'], experiment_name=f'other_head_{ema}')
    if not ema:
        cfg['custom_hooks'] = []
    # mmpretrain's EMAHook loads the EMA copy first, with torch's strict
    # load_state_dict: its RuntimeError names the keys as well.
    error = RuntimeError if ema else CheckpointMismatchError
    with pytest.raises(error, match='head.fc.weight'):
        train(cfg)


def test_pretrained_backbone_prefix_loads_only_backbone(variants, tiny_arch):
    """mmdet's way: init_cfg=Pretrained with prefix='backbone.' takes the
    backbone of a classifier with another head."""
    paths, state = variants
    model = build_model(model_cfg(tiny_arch, num_classes=5, init_cfg=dict(
        type='Pretrained', checkpoint=paths['whole'], prefix='backbone.')))
    model.init_weights()
    backbone = {k: v for k, v in state.items() if k.startswith('backbone.')}
    loaded = {k: v for k, v in model.state_dict().items()
              if k.startswith('backbone.')}
    assert_state_equal(loaded, backbone)
    assert model.head.fc.weight.shape == (5, 32)


def test_pretrained_bare_backbone_without_prefix(variants, tiny_arch):
    paths, state = variants
    model = build_model(model_cfg(tiny_arch, init_cfg=dict(
        type='Pretrained', checkpoint=paths['bare'])))
    model.init_weights()
    assert torch.equal(model.backbone.conv1.conv.weight,
                       state['backbone.conv1.conv.weight'])
    # The whole classifier without prefix into the backbone: named keys.
    model = build_model(model_cfg(tiny_arch, init_cfg=dict(
        type='Pretrained', checkpoint=paths['whole'])))
    with pytest.raises(CheckpointMismatchError,
                       match="carry the prefix 'backbone.'"):
        model.init_weights()


def test_backbone_of_other_width_raises(variants, tiny_arch):
    """A shape the backbone cannot take is an error, not a warning."""
    paths, state = variants
    bad = dict(state)
    bad['backbone.conv1.conv.weight'] = torch.zeros(8, 3, 3, 1)
    path = paths['bare'].replace('bare', 'bad_stem')
    torch.save(dict(state_dict=bad), path)
    model = build_model(model_cfg(tiny_arch))
    with pytest.raises((CheckpointMismatchError, ValueError),
                       match='conv1.conv.weight'):
        load_checkpoint(model, path)


def test_num_batches_tracked_may_be_missing(variants, tiny_arch):
    """As in mmengine, BN counters missing from a checkpoint are no error."""
    _, state = variants
    model = build_model(model_cfg(tiny_arch))
    missing, unexpected, shapes = atomnas_mm.checkpoint.key_mismatches(
        model, {k: v for k, v in state.items()
                if not k.endswith('num_batches_tracked')})
    assert (missing, unexpected, shapes) == ([], [], [])
    missing, _, _ = atomnas_mm.checkpoint.key_mismatches(
        model, {k: v for k, v in state.items() if k != 'head.fc.bias'})
    assert missing == ['head.fc.bias']


def test_other_models_keep_mmengine_warnings(tmp_path):
    """Models without an AtomNAS backbone load as mmengine loads them."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    path = str(tmp_path / 'other.pth')
    torch.save(dict(state_dict={'0.weight': torch.zeros(3, 2),
                                'extra': torch.zeros(1)}), path)
    load_checkpoint(model, path)  # a warning only
    assert torch.equal(model[0].weight, torch.zeros(3, 2))


def test_older_checkpoints_penalty_weight_buffer_loads():
    """Checkpoints written before the buffer was named ``penalty_weight``
    hold ``atom_cost``: the backbone loads them under the new name."""
    from atomnas_mm.models import AtomNAS
    from harness import SUPERNET
    source = AtomNAS(arch=SUPERNET)
    for block in source.blocks():
        block.penalty_weight.uniform_()
    old = {k.replace('penalty_weight', 'atom_cost'): v
           for k, v in source.state_dict().items()}
    assert any(k.endswith('.atom_cost') for k in old)
    model = AtomNAS(arch=SUPERNET)
    model.load_state_dict(old)
    for a, b in zip(model.blocks(), source.blocks()):
        assert torch.equal(a.penalty_weight, b.penalty_weight)
