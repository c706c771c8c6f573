"""Issue 20, point 1: a run killed at any iteration and resumed ends where
an uninterrupted one ends, with the same weights (CPU, same seed).

Through ``tools/train.py`` in subprocesses: the shortened demo with
checkpoints by iteration, killed (``os._exit``) at a training step, then
``--resume``.
"""
import json
import os
import os.path as osp
import subprocess
import textwrap

import pytest
import torch

from atomnas_mm.checkpoint import read_checkpoint
from atomnas_mm.datasets import DEBIAN_ROOT
from harness import CHECKPOINT_EVERY_ITER, FAST_SHRINK, demo_cmd

KILLED = 86

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not osp.isdir(DEBIAN_ROOT),
    reason='needs the Debian package dataset-fashion-mnist')]

# Dies (os._exit) at the nth call of BaseModel.train_step.
INJECTOR = textwrap.dedent('''\
    import os, runpy, sys
    from mmengine.model import BaseModel
    nth, calls, real = int(os.environ['ATOMNAS_KILL_STEP']), [], \\
        BaseModel.train_step

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(%d)
        return real(*args, **kwargs)

    BaseModel.train_step = train_step
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name='__main__')
''' % KILLED)

ITERS_PER_EPOCH = 4
EPOCHS = 2


def cmd(work_dir, cache, *extra, injector=None, workers=0):
    """The demo, 2 epochs of 4 iterations, a checkpoint every iteration,
    a shrink every 2 iterations."""
    return demo_cmd(work_dir, cache, *extra, epochs=EPOCHS, batch_size=16,
                    iters_per_epoch=ITERS_PER_EPOCH, workers=workers,
                    injector=injector,
                    options=CHECKPOINT_EVERY_ITER + FAST_SHRINK)


def run(command, cwd, **env):
    full = dict(os.environ, OMP_NUM_THREADS='1', **env)
    return subprocess.run(command, cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp('fashion_mnist_cache'))


def final(work_dir):
    last = open(osp.join(work_dir, 'last_checkpoint')).read().strip()
    return last, read_checkpoint(last)


def same_weights(a, b):
    keys = set(a['state_dict']) | set(b['state_dict'])
    diff = [k for k in sorted(keys) if k not in a['state_dict']
            or k not in b['state_dict']
            or not torch.equal(a['state_dict'][k], b['state_dict'][k])]
    return diff


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, cache):
    out = {}
    for workers in (0, 2):
        tmp = tmp_path_factory.mktemp(f'whole{workers}')
        work_dir = str(tmp / 'work')
        done = run(cmd(work_dir, cache, workers=workers), str(tmp))
        assert done.returncode == 0, done.stderr[-3000:]
        out[workers] = final(work_dir)
    return out


def kill_and_resume(tmp_path, cache, step, workers):
    injector = tmp_path / 'inject.py'
    injector.write_text(INJECTOR)
    work_dir = str(tmp_path / 'work')
    killed = run(cmd(work_dir, cache, injector=str(injector),
                     workers=workers), str(tmp_path),
                 ATOMNAS_KILL_STEP=str(step))
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    resumed = run(cmd(work_dir, cache, '--resume', workers=workers),
                  str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return work_dir, resumed.stdout + resumed.stderr


# Steps 3 and 7: mid-epoch (checkpoints iter_2 / iter_6); 5: the first
# step of epoch 2 (iter_4.pth, taken at the last batch of epoch 1).
@pytest.mark.parametrize('step, workers', [(3, 0), (7, 0), (5, 0), (6, 2)])
def test_killed_run_resumes_exactly(tmp_path, cache, uninterrupted, step,
                                    workers):
    work_dir, log = kill_and_resume(tmp_path, cache, step, workers)
    want_path, want = uninterrupted[workers]
    path, got = final(work_dir)
    total = ITERS_PER_EPOCH * EPOCHS
    assert osp.basename(path) == osp.basename(want_path) == \
        f'iter_{total}.pth'
    assert got['meta']['iter'] == want['meta']['iter'] == total
    assert got['meta']['epoch'] == want['meta']['epoch']
    done = step - 1
    if done % ITERS_PER_EPOCH:
        assert (f'Resuming in epoch {done // ITERS_PER_EPOCH + 1} after its '
                f'batch {done % ITERS_PER_EPOCH}') in log
    assert same_weights(got, want) == []
    assert torch.equal(got['ema_state_dict']['steps'],
                       want['ema_state_dict']['steps'])
    assert got['meta']['atomnas_arch'] == want['meta']['atomnas_arch']
    with open(osp.join(work_dir, 'searched_arch.json')) as f:
        assert json.load(f) == want['meta']['atomnas_arch']


def test_without_exact_resume_the_schedule_overruns(tmp_path, cache):
    """The control: mmengine alone replays the interrupted epoch from its
    first batch and trains past max_iters (what issue 20 found)."""
    injector = tmp_path / 'inject.py'
    injector.write_text(INJECTOR)
    work_dir = str(tmp_path / 'work')
    off = ['default_hooks.checkpoint.exact_resume=False']
    killed = run(cmd(work_dir, cache, injector=str(injector)) + off,
                 str(tmp_path), ATOMNAS_KILL_STEP='3')
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    resumed = run(cmd(work_dir, cache, '--resume') + off, str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, got = final(work_dir)
    assert got['meta']['iter'] == ITERS_PER_EPOCH * EPOCHS + 2
