"""Issue 20, points 5 and 6: one run per work_dir, a full disk, a damaged
last checkpoint.

The end-to-end tests run ``tools/train.py`` in subprocesses on the shortened
demo (2 epochs of 4 iterations, a checkpoint every iteration, 3 kept); an
injector script pauses, kills or fills the disk at a training step.
"""
import errno
import json
import os
import os.path as osp
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from atomnas_mm.checkpoint import find_latest_checkpoint, read_checkpoint
from atomnas_mm.datasets import DEBIAN_ROOT
from atomnas_mm.engine import runner_lock
from atomnas_mm.engine.runner_lock import (LOCK_NAME, WorkDirBusyError,
                                           WorkDirLock)
from atomnas_mm.fileio import atomic_write_bytes
from harness import CHECKPOINT_EVERY_ITER, FAST_SHRINK, demo_cmd

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
KILLED = 86
needs_data = pytest.mark.skipif(
    not osp.isdir(DEBIAN_ROOT),
    reason='needs the Debian package dataset-fashion-mnist')

# At the nth call of BaseModel.train_step: ATOMNAS_KILL_STEP dies
# (os._exit); ATOMNAS_PAUSE_STEP creates $ATOMNAS_PAUSE_DIR/ready and waits
# for $ATOMNAS_PAUSE_DIR/go; ATOMNAS_FULL_STEP fills the disk: with
# ATOMNAS_FILLER a file there takes all free space (a real ENOSPC), else
# every later write of a .pth file through atomnas_mm.fileio raises ENOSPC.
INJECTOR = textwrap.dedent('''\
    import errno, io, os, runpy, sys, time
    from mmengine.model import BaseModel
    env = os.environ.get
    calls, real = [], BaseModel.train_step

    def fill_disk():
        if env('ATOMNAS_FILLER'):
            with open(env('ATOMNAS_FILLER'), 'wb') as f:
                try:
                    while True:
                        f.write(b'x' * 65536)
                        f.flush()
                except OSError:
                    pass
            return
        import atomnas_mm.fileio as fileio

        class Full(io.FileIO):
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def full_open(path, mode='r', *args, **kwargs):
            if path.endswith('.tmp') and '.pth.' in path:
                return Full(path, mode.replace('b', ''))
            return open(path, mode, *args, **kwargs)

        fileio.open = full_open

    def train_step(*args, **kwargs):
        calls.append(1)
        n = len(calls)
        if n == int(env('ATOMNAS_KILL_STEP', 0)):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(%d)
        if n == int(env('ATOMNAS_PAUSE_STEP', 0)):
            folder = env('ATOMNAS_PAUSE_DIR')
            open(os.path.join(folder, 'ready'), 'w').close()
            deadline = time.time() + 300
            while not os.path.exists(os.path.join(folder, 'go')) and \\
                    time.time() < deadline:
                time.sleep(0.1)
        if n == int(env('ATOMNAS_FULL_STEP', 0)):
            fill_disk()
        return real(*args, **kwargs)

    BaseModel.train_step = train_step
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name='__main__')
''' % KILLED)

ITERS_PER_EPOCH = 4
EPOCHS = 2
TOTAL = ITERS_PER_EPOCH * EPOCHS


def cmd(work_dir, cache, *extra, injector=None):
    """The shortened demo: 2 epochs of 4 iterations, a checkpoint every
    iteration (3 kept), a shrink every 2 iterations."""
    return demo_cmd(work_dir, cache, *extra, epochs=EPOCHS, batch_size=16,
                    iters_per_epoch=ITERS_PER_EPOCH, injector=injector,
                    options=CHECKPOINT_EVERY_ITER + (
                        'default_hooks.checkpoint.max_keep_ckpts=3', ) +
                    FAST_SHRINK)


def env(**extra):
    return dict(os.environ, OMP_NUM_THREADS='1', **extra)


def run(command, cwd, **extra):
    return subprocess.run(command, cwd=cwd, env=env(**extra),
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp('fashion_mnist_cache'))


def last_checkpoint(work_dir):
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def injector(tmp_path):
    path = tmp_path / 'inject.py'
    path.write_text(INJECTOR)
    return str(path)


# -- the lock, in-process ----------------------------------------------------
# The holder loads runner_lock.py alone (stdlib only): a process that
# takes no 2 s to import torch and mmengine.
HOLD = textwrap.dedent('''\
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location('runner_lock', sys.argv[3])
    runner_lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner_lock)
    lock = runner_lock.WorkDirLock(sys.argv[1])
    lock.acquire()
    print('held', flush=True)
    if sys.argv[2] == 'die':
        import os
        os._exit(3)
    sys.stdin.read()
    lock.release()
''')


def hold(work_dir, how):
    proc = subprocess.Popen([sys.executable, '-c', HOLD, work_dir, how,
                             runner_lock.__file__],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == 'held'
    return proc


def test_lock_held_by_a_live_process_is_refused_naming_it(tmp_path):
    work_dir = str(tmp_path / 'work')
    proc = hold(work_dir, 'wait')
    try:
        with pytest.raises(WorkDirBusyError) as info:
            WorkDirLock(work_dir).acquire()
        message = str(info.value)
        assert f'PID {proc.pid}' in message
        assert f'work_dir {work_dir} is in use' in message
        assert '--work-dir' in message
    finally:
        proc.communicate('')
    assert proc.returncode == 0
    assert not osp.exists(osp.join(work_dir, LOCK_NAME))  # released: removed
    with WorkDirLock(work_dir) as lock:  # free again
        assert lock.previous is None and lock.stale_message() is None


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    work_dir = str(tmp_path / 'work')
    proc = hold(work_dir, 'die')
    proc.wait()
    assert osp.exists(osp.join(work_dir, LOCK_NAME))  # left behind
    lock = WorkDirLock(work_dir)
    previous = lock.acquire()
    try:
        assert previous['pid'] == proc.pid
        message = lock.stale_message()
        assert f'PID {proc.pid}' in message and 'no longer running' in message
        with open(osp.join(work_dir, LOCK_NAME)) as f:
            assert json.load(f)['pid'] == os.getpid()
    finally:
        lock.release()


# -- damaged checkpoints, full disk, in-process ------------------------------
def test_find_latest_checkpoint_skips_a_truncated_last_one(tmp_path):
    work_dir = str(tmp_path)
    paths = []
    for i in (1, 2, 3):
        path = osp.join(work_dir, f'iter_{i}.pth')
        torch.save({'state_dict': {'w': torch.full((1000, ), float(i))}},
                   path)
        os.utime(path, (1000 + i, 1000 + i))
        paths.append(path)
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(paths[2])
    assert find_latest_checkpoint(work_dir) == paths[2]
    with open(paths[2], 'r+b') as f:
        f.truncate(os.path.getsize(paths[2]) // 2)
    assert find_latest_checkpoint(work_dir) == paths[1]  # newest intact


def test_find_latest_checkpoint_warns_naming_the_skipped_file(tmp_path,
                                                              capsys):
    work_dir = str(tmp_path)
    good, bad = (osp.join(work_dir, f'iter_{i}.pth') for i in (1, 2))
    torch.save({'w': torch.zeros(10)}, good)
    with open(bad, 'wb') as f:
        f.write(b'PK\x03\x04' + b'\0' * 100)  # a zip cut after its header
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(bad)
    from mmengine.logging import MMLogger
    MMLogger.get_instance('test_rough_edges_lock_disk_warn')
    assert find_latest_checkpoint(work_dir) == good
    out = capsys.readouterr()
    text = out.out + out.err
    assert f'The latest checkpoint {bad} cannot be resumed from' in text
    assert f'resuming from the newest intact one, {good}' in text


def test_find_latest_checkpoint_without_an_intact_one_names_the_last(
        tmp_path):
    bad = osp.join(str(tmp_path), 'iter_1.pth')
    open(bad, 'wb').close()
    with open(osp.join(str(tmp_path), 'last_checkpoint'), 'w') as f:
        f.write(bad)
    assert find_latest_checkpoint(str(tmp_path)) == bad  # loading names it


def test_atomic_write_error_names_the_target_not_the_temp(tmp_path,
                                                          monkeypatch):
    import atomnas_mm.fileio as fileio
    real_open = open

    class Full:
        def __init__(self, path, mode):
            self.f = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio, 'open', Full, raising=False)
    target = str(tmp_path / 'searched_arch.json')
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b'{}')
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == target
    assert target in str(info.value)
    assert os.listdir(tmp_path) == []  # the temporary file is removed


# -- through tools/train.py --------------------------------------------------
@pytest.mark.slow
@needs_data
def test_second_train_on_a_live_work_dir_stops_naming_the_first(
        tmp_path, cache):
    work_dir = str(tmp_path / 'work')
    pause = tmp_path / 'pause'
    pause.mkdir()
    first = subprocess.Popen(
        cmd(work_dir, cache, injector=injector(tmp_path)), cwd=str(tmp_path),
        env=env(ATOMNAS_PAUSE_STEP='2', ATOMNAS_PAUSE_DIR=str(pause)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (pause / 'ready').exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        before = sorted(os.listdir(work_dir))
        second = run(cmd(work_dir, cache, '--resume'), str(tmp_path))
        assert second.returncode != 0
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith('train.py: error: work_dir ')
        assert f'PID {first.pid}' in last and 'is in use' in last
        assert sorted(os.listdir(work_dir)) == before  # nothing written
    finally:
        (pause / 'go').touch()
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert osp.basename(last_checkpoint(work_dir)) == f'iter_{TOTAL}.pth'
    assert not osp.exists(osp.join(work_dir, LOCK_NAME))


@pytest.mark.slow
@needs_data
def test_killed_run_resumes_over_its_stale_lock_and_a_truncated_checkpoint(
        tmp_path, cache):
    """A run killed after iteration 3 leaves its lock, iter_1..3.pth and
    (planted) temporary files of searched_arch.json and arch.png; iter_3.pth
    is then truncated. ``--resume`` takes the lock over, resumes from
    iter_2.pth with a warning naming iter_3.pth, removes the temporary
    files and ends at the last iteration."""
    work_dir = str(tmp_path / 'work')
    killed = subprocess.Popen(
        cmd(work_dir, cache, injector=injector(tmp_path)), cwd=str(tmp_path),
        env=env(ATOMNAS_KILL_STEP='4'), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    _, err = killed.communicate(timeout=900)
    assert killed.returncode == KILLED, err[-3000:]
    with open(osp.join(work_dir, LOCK_NAME)) as f:
        assert json.load(f)['pid'] == killed.pid  # left by the killed run
    newest = last_checkpoint(work_dir)
    assert osp.basename(newest) == 'iter_3.pth'
    with open(newest, 'r+b') as f:
        f.truncate(osp.getsize(newest) - 1000)
    temps = [osp.join(work_dir, '.searched_arch.json.0123abcd.tmp'),
             osp.join(work_dir, '.arch.png.89abcdef.tmp')]
    for path in temps:
        open(path, 'w').close()

    resumed = run(cmd(work_dir, cache, '--resume'), str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert (f"took over the stale lock {osp.join(work_dir, LOCK_NAME)} of "
            f"PID {killed.pid}") in log
    intact = osp.join(work_dir, 'iter_2.pth')
    assert f'The latest checkpoint {newest} cannot be resumed from' in log
    assert f'resuming from the newest intact one, {intact}' in log
    assert not any(osp.exists(p) for p in temps)
    final = last_checkpoint(work_dir)
    assert osp.basename(final) == f'iter_{TOTAL}.pth'
    assert read_checkpoint(final)['meta']['iter'] == TOTAL
    assert not osp.exists(osp.join(work_dir, LOCK_NAME))


def mount_tmpfs(folder, size):
    os.makedirs(folder)
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}',
                           'tmpfs', folder], capture_output=True)
    return done.returncode == 0


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize('disk', ['tmpfs', 'patched'])
def test_full_disk_names_the_file_and_how_to_resume(tmp_path, cache, disk):
    """The disk fills after iteration 3 (``tmpfs``: a real full tmpfs,
    needs the right to mount; ``patched``: writes of checkpoints raise
    ENOSPC). The run stops with one line naming the file, the intact last
    checkpoint and --resume; with space again, --resume finishes."""
    folder = str(tmp_path / 'disk')
    extra = {}
    if disk == 'tmpfs':
        if not mount_tmpfs(folder, '64m'):
            pytest.skip('cannot mount a tmpfs here (needs root)')
        extra['ATOMNAS_FILLER'] = osp.join(folder, 'filler')
    else:
        os.makedirs(folder)
    try:
        work_dir = osp.join(folder, 'work')
        full = subprocess.run(
            cmd(work_dir, cache, injector=injector(tmp_path)),
            cwd=str(tmp_path), env=env(ATOMNAS_FULL_STEP='4', **extra),
            capture_output=True, text=True, timeout=900)
        assert full.returncode == 1, full.stderr[-3000:]
        last = full.stderr.strip().splitlines()[-1]
        match = re.match(r'train\.py: error: disk full: (\S+) could not be '
                         r'written \(No space left on device\); the last '
                         r'complete checkpoint, (\S+), is intact', last)
        assert match, full.stderr[-3000:]
        failed, intact = match.groups()
        assert failed.startswith(work_dir + os.sep)
        if disk == 'patched':
            assert failed == osp.join(work_dir, 'iter_4.pth')
        assert intact == last_checkpoint(work_dir)
        read_checkpoint(intact)  # really intact
        assert f'Free space on the disk of {work_dir}' in last
        assert last.endswith('then run the same command with --resume to '
                             'continue from it.')
        assert not [n for n in os.listdir(work_dir) if n.endswith('.tmp')]
        if disk == 'tmpfs':
            os.remove(extra['ATOMNAS_FILLER'])
        resumed = run(cmd(work_dir, cache, '--resume'), str(tmp_path))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert osp.basename(last_checkpoint(work_dir)) == \
            f'iter_{TOTAL}.pth'
    finally:
        if disk == 'tmpfs':
            subprocess.run(['umount', folder], capture_output=True)
