"""A kill at any moment loses at most the work since the last checkpoint.

Atomic writes (``atomnas_mm.fileio``), pictures that cannot stop training
(``atomnas_mm.visualization``), ``atomnas_mm.SafeCheckpointHook`` in every
shipped config, and faults injected into real runs: in-process for every
file operation of a checkpoint save, and in a ``tools/train.py`` subprocess
killed with ``os._exit`` half-way through a write, then ``--resume``.
"""
import builtins
import errno
import glob
import json
import logging
import os
import os.path as osp
import re
import subprocess
import textwrap

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from PIL import Image

import atomnas_mm  # noqa: F401
from atomnas_mm import fileio
from atomnas_mm.checkpoint import (SafeCheckpointHook,
                                   UnreadableCheckpointError, read_checkpoint)
from atomnas_mm.datasets import DEBIAN_ROOT
from atomnas_mm.visualization import save_image, save_image_or_warn
from harness import FAST_SHRINK, build
from harness import demo_cmd as harness_demo_cmd
from harness import toy_classifier, toy_loader

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
KILLED = 86  # exit status of an injected kill
SAFE = 'atomnas_mm.SafeCheckpointHook'


def temp_files(folder):
    return sorted(glob.glob(osp.join(folder, '**', '.*.tmp'), recursive=True))


# -- atomic writes -----------------------------------------------------------
def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / 'sub' / 'a.bin'
    fileio.atomic_write_bytes(path, b'old')
    fileio.atomic_write_bytes(path, b'new content')
    assert path.read_bytes() == b'new content'
    fileio.atomic_write_json(tmp_path / 'a.json', dict(x=[1, 2]), indent=1)
    assert json.loads((tmp_path / 'a.json').read_text()) == dict(x=[1, 2])
    assert temp_files(str(tmp_path)) == []


class Fault(BaseException):
    """Stands in for a kill (not an Exception: nothing may swallow it)."""


def failing_writes(monkeypatch, error, after=3):
    """Make writes to temporary files write ``after`` bytes, then raise."""
    real_open = builtins.open

    class Cut:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:after])
            self.f.flush()
            raise error

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(file, mode='r', *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Cut(f) if str(file).endswith('.tmp') else f

    monkeypatch.setattr(builtins, 'open', fake_open)


@pytest.mark.parametrize('error', [OSError(errno.ENOSPC, 'No space left'),
                                   Fault()])
def test_failed_write_keeps_old_file(tmp_path, monkeypatch, error):
    path = tmp_path / 'searched_arch.json'
    fileio.atomic_write_json(path, dict(rows=[1]))
    failing_writes(monkeypatch, error)
    with pytest.raises(type(error)):
        fileio.atomic_write_json(path, dict(rows=[1, 2, 3]))
    monkeypatch.undo()
    assert json.loads(path.read_text()) == dict(rows=[1])
    assert temp_files(str(tmp_path)) == []  # removed on failure


def test_unserialisable_json_leaves_file(tmp_path):
    path = tmp_path / 'a.json'
    fileio.atomic_write_json(path, [1])
    with pytest.raises(TypeError):
        fileio.atomic_write_json(path, [object()])
    assert json.loads(path.read_text()) == [1]


def test_remove_stale_temp_files(tmp_path):
    for name in ('.epoch_1.pth.0123abcd.tmp', '.last_checkpoint.89abcdef.tmp',
                 '.x.tmp', 'epoch_1.pth'):
        (tmp_path / name).write_bytes(b'')
    removed = fileio.remove_stale_temp_files(
        str(tmp_path), lambda name: name.endswith('.pth'))
    assert [osp.basename(p) for p in removed] == ['.epoch_1.pth.0123abcd.tmp']
    assert sorted(os.listdir(tmp_path)) == [
        '.last_checkpoint.89abcdef.tmp', '.x.tmp', 'epoch_1.pth']


def test_atomic_backend_selected_by_name(tmp_path):
    from mmengine.fileio import get_file_backend
    backend = get_file_backend(
        str(tmp_path), backend_args=dict(backend=fileio.ATOMIC_BACKEND))
    assert isinstance(backend, fileio.AtomicLocalBackend)
    backend.put(b'abc', str(tmp_path / 'f'))
    backend.put_text('text', str(tmp_path / 'g'))
    assert (tmp_path / 'f').read_bytes() == b'abc'
    assert (tmp_path / 'g').read_text() == 'text'


# -- pictures ------------------------------------------------------------------
IMG = np.full((8, 12, 3), 200, dtype=np.uint8)


def test_save_image_full_disk_keeps_old_picture(tmp_path, monkeypatch):
    path = str(tmp_path / 'arch.png')
    save_image(IMG, path)
    old = open(path, 'rb').read()
    failing_writes(monkeypatch, OSError(errno.ENOSPC, 'No space left'))
    with pytest.raises(OSError):
        save_image(IMG[:4], path)
    monkeypatch.undo()
    assert open(path, 'rb').read() == old
    assert np.asarray(Image.open(path)).shape == (8, 12, 3)
    assert temp_files(str(tmp_path)) == []


def test_save_image_or_warn_logs_instead_of_raising(tmp_path, monkeypatch,
                                                    caplog):
    path = str(tmp_path / 'flops.png')
    logger = logging.getLogger('atomnas_test_pictures')
    assert save_image_or_warn(IMG, path, logger=logger) == path
    failing_writes(monkeypatch, OSError(errno.ENOSPC, 'No space left'))
    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert save_image_or_warn(IMG, path, logger=logger) is None
    monkeypatch.undo()
    assert 'flops.png' in caplog.text and 'No space left' in caplog.text
    assert np.asarray(Image.open(path)).shape == (8, 12, 3)
    with pytest.raises(ValueError, match='RGB uint8'):  # a bug still raises
        save_image_or_warn(IMG[..., 0], path, logger=logger)


# -- shipped configs -------------------------------------------------------------
CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs/**/*.py'), recursive=True))


@pytest.mark.parametrize('path', CONFIGS,
                         ids=[osp.relpath(p, ROOT) for p in CONFIGS])
def test_shipped_configs_save_safely(path):
    """Every config that trains checkpoints with SafeCheckpointHook; only
    the _base_ parts may have no checkpoint hook."""
    cfg = Config.fromfile(path)
    checkpoint = cfg.get('default_hooks', {}).get('checkpoint')
    if checkpoint is None:
        assert '/_base_/' in path, path
        return
    hook = HOOKS.get(checkpoint['type'])
    assert hook is not None and issubclass(hook, SafeCheckpointHook), \
        checkpoint['type']
    assert not checkpoint.get('backend_args')  # atomic local writes


# -- in-process faults at every file operation of a save --------------------------
def toy_cfg(arch, work_dir, hook_type, max_epochs=3):
    loader = toy_loader(n=8, num_classes=2, shuffle=False)
    return dict(
        model=toy_classifier(arch, num_classes=2),
        work_dir=work_dir, train_dataloader=loader, val_dataloader=loader,
        val_evaluator=dict(type='Accuracy'), val_cfg=dict(),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        default_hooks=dict(checkpoint=dict(
            type=hook_type, interval=1, max_keep_ckpts=1, save_best='auto')),
        randomness=dict(seed=0), default_scope='mmpretrain',
        log_level='WARNING')


def toy_runner(arch, work_dir, hook_type=SAFE, **kwargs):
    """The toy run; the metric rises every epoch, so each one writes a best
    file."""
    return build(dict(toy_cfg(arch, work_dir, hook_type), **kwargs),
                 [RisingAccuracy()])


class RisingAccuracy(Hook):
    """Replaces the metrics by ``epoch``: a new best every epoch."""

    priority = 'VERY_HIGH'

    def after_val_epoch(self, runner, metrics=None):
        metrics['accuracy/top1'] = float(runner.epoch)


CKPT_OP = re.compile(r'^\.?(epoch_\d+\.pth|best_\S+\.pth|last_checkpoint)')


def inject(monkeypatch, kill_at):
    """Raise :class:`Fault` at a checkpoint file operation (open for writing,
    replace, remove), half-way through a write; return the list of
    operations seen.

    Args:
        kill_at (int | tuple[str, int]): The operation's number, or its
            label (e.g. ``'write epoch_2.pth'``) and occurrence.
    """
    ops = []
    real_open, real_replace, real_remove = builtins.open, os.replace, os.remove

    def hit(kind, path):
        name = osp.basename(os.fspath(path))
        if CKPT_OP.match(name):
            ops.append(f'{kind} ' + re.sub(r'^\.(.+)\.[0-9a-f]{8}\.tmp$',
                                           r'\1 (temp)', name))
            if isinstance(kill_at, tuple):
                label = ops[-1].replace(' (temp)', '')
                return label == kill_at[0] and [
                    o.replace(' (temp)', '') for o in ops].count(
                        label) == kill_at[1]
            return len(ops) == kill_at
        return False

    class Cut:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise Fault(ops[-1])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(file, mode='r', *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in 'wxa') and hit('write', file):
            return Cut(f)
        return f

    def fake_replace(src, dst, *args, **kwargs):
        if hit('replace', dst):
            raise Fault(ops[-1])
        return real_replace(src, dst, *args, **kwargs)

    def fake_remove(path, *args, **kwargs):
        if hit('remove', path):
            raise Fault(ops[-1])
        return real_remove(path, *args, **kwargs)

    monkeypatch.setattr(builtins, 'open', fake_open)
    monkeypatch.setattr(os, 'replace', fake_replace)
    monkeypatch.setattr(os, 'remove', fake_remove)
    return ops


def resumable(work_dir):
    """The checkpoint ``--resume`` (auto) would load, or why there is none."""
    from mmengine.runner import find_latest_checkpoint
    path = find_latest_checkpoint(work_dir)
    if path is None:
        return None
    read_checkpoint(path)  # raises for a missing or unreadable file
    return path


def run_with_fault(arch, work_dir, hook_type, kill_at, monkeypatch):
    """Train with a fault at the ``kill_at``-th operation; return the
    operations and the checkpoint left for resuming."""
    ops = inject(monkeypatch, kill_at)
    with pytest.raises(Fault):
        toy_runner(arch, work_dir, hook_type).train()
    monkeypatch.undo()
    return ops, resumable(work_dir)


# Checkpoint file operations of a 3-epoch toy run with SafeCheckpointHook.
# Per epoch: the checkpoint, last_checkpoint, the outdated checkpoint
# removed, the best file, the checkpoint again (mmengine re-saves it to
# record the best), last_checkpoint, the outdated best file removed.
N_OPS = 34


def test_operation_order(tiny_arch, tmp_path, monkeypatch):
    ops = inject(monkeypatch, kill_at=-1)
    toy_runner(tiny_arch, str(tmp_path)).train()
    monkeypatch.undo()
    assert len(ops) == N_OPS, ops
    assert ops[10:22] == [
        'write epoch_2.pth (temp)', 'replace epoch_2.pth',
        'write last_checkpoint (temp)', 'replace last_checkpoint',
        'remove epoch_1.pth',
        'write best_accuracy_top1_epoch_2.pth (temp)',
        'replace best_accuracy_top1_epoch_2.pth',
        'write epoch_2.pth (temp)', 'replace epoch_2.pth',
        'write last_checkpoint (temp)', 'replace last_checkpoint',
        'remove best_accuracy_top1_epoch_1.pth']
    # Every write goes to a temporary file; removals come last.
    assert all(o.endswith('(temp)') for o in ops if o.startswith('write'))
    assert all(ops[i - 1] == 'replace last_checkpoint'
               for i, o in enumerate(ops) if o.startswith('remove'))


@pytest.fixture(scope='module')
def uninterrupted(tiny_arch, tmp_path_factory):
    """The final weights of the toy run without a fault."""
    work_dir = str(tmp_path_factory.mktemp('uninterrupted'))
    runner = toy_runner(tiny_arch, work_dir)
    runner.train()
    return runner.model.state_dict()


def orphan_best(ops):
    """The best file a fault left unrecorded: written, but the checkpoint
    re-save that records it in the message hub did not complete."""
    done = ops[:-1]  # the last operation is the one that failed
    best = [i for i, o in enumerate(done) if o.startswith('replace best_')]
    if best and not any(o.startswith('replace epoch_')
                        for o in done[best[-1]:]):
        return done[best[-1]].split()[1]
    return None


# Fast by default: epoch 2's first checkpoint write, its re-save and the
# removal of epoch 1's checkpoint; every operation with -m slow.
FAST_KILLS = (11, 18, 15)


@pytest.mark.parametrize('kill_at', [
    pytest.param(k, marks=() if k in FAST_KILLS else pytest.mark.slow)
    for k in range(1, N_OPS + 1)])
def test_fault_at_any_checkpoint_operation(tiny_arch, tmp_path, monkeypatch,
                                           kill_at, uninterrupted):
    work_dir = str(tmp_path)
    ops, path = run_with_fault(tiny_arch, work_dir, SAFE, kill_at,
                               monkeypatch)
    ops = [o for o in ops if '(temp)' not in o or o.startswith('write')]
    # Before the first last_checkpoint there is nothing to resume; after,
    # always a complete checkpoint.
    first = ops.index('replace last_checkpoint') + 1 if \
        'replace last_checkpoint' in ops[:-1] else len(ops)
    assert (path is None) == (len(ops) <= first), ops
    runner = toy_runner(tiny_arch, work_dir, resume=True)
    runner.train()
    assert runner.epoch == 3
    # No randomness in this run: resuming loses nothing.
    state = runner.model.state_dict()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(state[key], value, msg=key)
    last = osp.join(work_dir, 'epoch_3.pth')
    assert resumable(work_dir) == last
    # The best file the run knows exists. A resume from epoch_3.pth skips
    # the validation of epoch 3 (mmengine resumes after the saved epoch).
    best = runner.message_hub.get_info('best_ckpt')
    assert osp.isfile(best)
    if path != last:
        assert osp.basename(best) == 'best_accuracy_top1_epoch_3.pth'
    left = {p for p in os.listdir(work_dir) if p.endswith('.pth')}
    # A best file whose record the fault prevented is kept (never lost).
    assert left - {'epoch_3.pth', osp.basename(best)} <= {orphan_best(ops)}
    assert temp_files(work_dir) == []


# -- a real training process killed half-way through a write ------------------------
needs_data = pytest.mark.skipif(
    not osp.isdir(DEBIAN_ROOT),
    reason='needs the Debian package dataset-fashion-mnist')

INJECTOR = textwrap.dedent('''\
    """Run tools/train.py with one fault from $ATOMNAS_FAULT (JSON)."""
    import builtins, json, os, re, runpy, sys

    spec = json.loads(os.environ['ATOMNAS_FAULT'])
    pattern, seen = re.compile(spec['match']), []


    def hit(path):
        if pattern.search(os.path.basename(os.fspath(path))):
            seen.append(path)
            return len(seen) == spec.get('nth', 1)
        return False


    def die():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(%d)


    class Cut:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:int(len(data) * spec.get('fraction', 0.5))])
            self.f.flush()
            os.fsync(self.f.fileno())
            die()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.f, name)


    if spec['op'] == 'write':
        real_open = builtins.open

        def fake_open(file, mode='r', *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and any(
                    c in mode for c in 'wxa') and hit(file):
                return Cut(f)
            return f

        builtins.open = fake_open
    elif spec['op'] == 'call':  # die at the nth call of module:attr.path
        import importlib
        module, path = spec['match'].split(':')
        owner = importlib.import_module(module)
        *parents, name = path.split('.')
        for parent in parents:
            owner = getattr(owner, parent)
        real, calls = getattr(owner, name), []

        def fake(*args, **kwargs):
            calls.append(1)
            if len(calls) == spec.get('nth', 1):
                die()
            return real(*args, **kwargs)

        setattr(owner, name, fake)
    else:  # 'replace' or 'remove': die instead of doing it
        real = getattr(os, spec['op'])

        def fake(*args, **kwargs):
            if hit(args[-1] if spec['op'] == 'replace' else args[0]):
                die()
            return real(*args, **kwargs)

        setattr(os, spec['op'], fake)

    train = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(train, run_name='__main__')
''' % KILLED)


@pytest.fixture(scope='module')
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp('fashion_mnist_cache'))


def demo_cmd(work_dir, cache, *extra, injector=None):
    """tools/train.py on the demo config, two epochs of two iterations, a
    shrink at the end of each (an EMA that follows more closely, a looser
    threshold than harness.FAST_SHRINK)."""
    return harness_demo_cmd(
        work_dir, cache, *extra, injector=injector,
        options=FAST_SHRINK + ('custom_hooks.0.momentum=0.9',
                               'custom_hooks.2.threshold=0.99'))


def run(cmd, cwd, fault=None):
    env = dict(os.environ)
    if fault:
        env['ATOMNAS_FAULT'] = json.dumps(fault)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def kill_then_resume(tmp_path, cache, fault, hook=None):
    """Run the demo with ``fault``; return the work_dir, what --resume
    would load, and the resumed run's output."""
    injector = tmp_path / 'inject.py'
    injector.write_text(INJECTOR)
    work_dir = str(tmp_path / 'work')
    extra = [f'default_hooks.checkpoint.type={hook}'] if hook else []
    cmd = demo_cmd(work_dir, cache, injector=str(injector))
    killed = run(cmd + extra, str(tmp_path), fault)
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    return work_dir, killed


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize('fault', [
    # epoch_2.pth half-written (its first write)
    dict(op='write', match=r'^\.?epoch_2\.pth', nth=1, fraction=0.5),
    # epoch_1.pth's second write (after the first best file, to record it)
    dict(op='write', match=r'^\.?epoch_1\.pth', nth=2, fraction=0.5),
    # complete but not yet renamed into place
    dict(op='replace', match=r'^epoch_2\.pth$', nth=1),
    # last_checkpoint half-written
    dict(op='write', match=r'^\.?last_checkpoint', nth=2, fraction=0.5),
    # everything written, the old checkpoint not yet removed
    dict(op='remove', match=r'^epoch_1\.pth$', nth=1),
], ids=['ckpt', 'ckpt-resave', 'ckpt-rename', 'last_checkpoint',
        'old-ckpt-removal'])
def test_kill_during_checkpoint_write_then_resume(tmp_path, data_cache,
                                                  fault):
    work_dir, _ = kill_then_resume(tmp_path, data_cache, fault)
    path = resumable(work_dir)
    assert path in (osp.join(work_dir, 'epoch_1.pth'),
                    osp.join(work_dir, 'epoch_2.pth'))
    resumed = run(demo_cmd(work_dir, data_cache, '--resume'), str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f'Auto resumed from the latest checkpoint {path}' in log
    assert resumable(work_dir) == osp.join(work_dir, 'epoch_2.pth')
    assert sorted(glob.glob(osp.join(work_dir, 'epoch_*.pth'))) == [
        osp.join(work_dir, 'epoch_2.pth')]  # max_keep_ckpts=1, none left over
    assert temp_files(work_dir) == []
    with open(osp.join(work_dir, 'searched_arch.json')) as f:
        assert 'backbone' in json.load(f)


@pytest.mark.slow
@needs_data
def test_stock_hook_kill_resumes_from_the_newest_intact_checkpoint(
        tmp_path, data_cache):
    """mmengine's CheckpointHook re-saves epoch_1.pth in place (to record
    the best file): a kill leaves it truncated, and --resume goes on from
    the newest intact checkpoint (the best file), naming both."""
    fault = dict(op='write', match=r'^\.?epoch_1\.pth', nth=2, fraction=0.5)
    work_dir, _ = kill_then_resume(tmp_path, data_cache, fault,
                                   hook='CheckpointHook')
    path = osp.join(work_dir, 'epoch_1.pth')
    with pytest.raises(UnreadableCheckpointError, match=re.escape(path)):
        resumable(work_dir)
    intact = glob.glob(osp.join(work_dir, 'best_*.pth'))
    assert len(intact) == 1
    resumed = run(demo_cmd(work_dir, data_cache, '--resume'), str(tmp_path))
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert (f'The latest checkpoint {path} cannot be resumed from' in log
            and f'resuming from the newest intact one, {intact[0]}' in log)
    assert f'Auto resumed from the latest checkpoint {intact[0]}' in log
    assert osp.isfile(osp.join(work_dir, 'epoch_2.pth'))


@pytest.mark.slow
@needs_data
def test_kill_during_searched_arch_write(tmp_path, data_cache):
    """The kill hits the second write of searched_arch.json (the first
    shrink): the first one stays valid, and the run resumes and finishes."""
    fault = dict(op='write', match=r'^\.?searched_arch\.json', nth=2,
                 fraction=0.5)
    work_dir, _ = kill_then_resume(tmp_path, data_cache, fault)
    with open(osp.join(work_dir, 'searched_arch.json')) as f:
        assert 'backbone' in json.load(f)
    resumed = run(demo_cmd(work_dir, data_cache, '--resume'), str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(osp.join(work_dir, 'searched_arch.json')) as f:
        assert 'backbone' in json.load(f)
    assert resumable(work_dir) == osp.join(work_dir, 'epoch_2.pth')


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize('fault, resumed_from', [
    # the third training step: epoch 2's first forward/backward
    (dict(op='call', nth=3, match='mmengine.model.base_model.base_model:'
          'BaseModel.train_step'), 'epoch_1.pth'),
    # half-way through the second shrink (iteration 4, after epoch_1.pth):
    # the model shrunk, its EMA copy not yet
    (dict(op='call', nth=4,
          match='atomnas_mm.engine.hooks.shrink_hook:apply_plan'),
     'epoch_1.pth'),
    # epoch 1's validation (after epoch_1.pth was saved)
    (dict(op='call', nth=1, match='mmengine.runner.loops:ValLoop.run_iter'),
     'epoch_1.pth'),
], ids=['forward', 'shrink', 'validation'])
def test_kill_in_other_phases_then_resume(tmp_path, data_cache, fault,
                                          resumed_from):
    """A kill outside a write loses the work since the last checkpoint."""
    work_dir, _ = kill_then_resume(tmp_path, data_cache, fault)
    path = resumable(work_dir)
    assert path == (osp.join(work_dir, resumed_from) if resumed_from
                    else None)
    resumed = run(demo_cmd(work_dir, data_cache, '--resume'), str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert 'accuracy/top1' in log
    # mmengine resumes after the saved epoch: the validation a kill
    # interrupted is not repeated, the next epoch's runs.
    assert ('Epoch(val) [1]' in log) == (path is None)
    assert 'Epoch(val) [2]' in log
    assert resumable(work_dir) == osp.join(work_dir, 'epoch_2.pth')
