"""Issue 20, point 2: a checkpoint records its search settings; a resume
with other settings stops naming them, unless
``resume_with_changed_search=True``."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
from mmengine.config import Config

from atomnas_mm.checkpoint import read_checkpoint
from atomnas_mm.datasets import DEBIAN_ROOT
from atomnas_mm.engine.search_settings import (META_KEY, SWITCH, differences,
                                               search_settings)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO = osp.join(ROOT, 'configs/demo/atomnas_fashion_mnist.py')
TARGET = osp.join(ROOT, 'configs/demo/atomnas_fashion_mnist_target.py')


def names(diffs):
    return [d[0] for d in diffs]


def test_demo_and_target_configs_differ_in_the_search_settings():
    plain = search_settings(Config.fromfile(DEMO))
    target = search_settings(Config.fromfile(TARGET))
    assert plain['AtomShrinkHook']['target'] is None
    assert plain['BNL1PenaltyHook']['rho'] == 3e-3
    assert plain['train_cfg'] == {'max_epochs': 4}
    diffs = dict((k, (a, b)) for k, a, b in differences(plain, target))
    assert diffs['AtomShrinkHook.target'] == (None, {'flops': 1.2e6})
    assert diffs['AtomShrinkHook.interval'] == (100, 50)
    assert differences(plain, plain) == []
    json.dumps(plain)  # stored in a weights_only checkpoint: plain data


def hooks_cfg(**shrink):
    return dict(custom_hooks=[
        dict(type='atomnas_mm.BNL1PenaltyHook', rho=1e-3),
        dict(type='atomnas_mm.AtomShrinkHook', **shrink)],
        train_cfg=dict(max_epochs=4))


def test_a_default_written_out_is_no_change():
    a = search_settings(hooks_cfg(target=dict(flops=1e6)))
    b = search_settings(hooks_cfg(target=dict(flops=1e6), deadline=0.5,
                                  tolerance=0.02))
    assert differences(a, b) == []
    c = search_settings(hooks_cfg(target=dict(flops=1e6), deadline=0.4))
    assert differences(a, c) == [('AtomShrinkHook.deadline', 0.5, 0.4)]


def test_the_penalty_schedule_and_training_length_are_settings():
    a = hooks_cfg()
    b = hooks_cfg()
    b['custom_hooks'][0]['warmup_epochs'] = 5
    b['train_cfg']['max_epochs'] = 8
    assert names(differences(search_settings(a), search_settings(b))) == [
        'BNL1PenaltyHook.warmup_epochs', 'train_cfg.max_epochs']


def test_a_latency_table_is_compared_by_its_content(tmp_path):
    table = {'blocks': [1, 2, 3]}
    first, moved = tmp_path / 'a.json', tmp_path / 'b.json'
    first.write_text(json.dumps(table))
    moved.write_text(json.dumps(table))

    def settings(path):
        return search_settings(hooks_cfg(target=dict(latency_ms=2.0),
                                         latency_table=str(path)))

    before = settings(first)
    assert differences(before, settings(moved)) == []  # moved, same table
    first.write_text(json.dumps({'blocks': [1, 2, 4]}))  # re-measured
    diffs = differences(before, settings(first))
    assert names(diffs) == ['AtomShrinkHook.latency_table']


@pytest.mark.slow
@pytest.mark.skipif(not osp.isdir(DEBIAN_ROOT),
                    reason='needs the Debian package dataset-fashion-mnist')
def test_resume_with_the_target_config_is_refused_naming_the_setting(
        tmp_path):
    """A plain-demo work_dir (2 epochs of 4 iterations, checkpoints by
    epoch) resumed with the target config stops before training naming
    ``AtomShrinkHook.target``; with the switch it runs on."""
    cache, work_dir = str(tmp_path / 'cache'), str(tmp_path / 'work')

    def cmd(config, *extra):
        return [sys.executable, osp.join(ROOT, 'tools/train.py'), config,
                '--work-dir', work_dir, '--resume', '--cfg-options',
                'train_cfg.max_epochs=2', 'train_dataloader.batch_size=16',
                'train_dataloader.dataset.indices=64',
                'val_dataloader.dataset.indices=32',
                f'train_dataloader.dataset.cache_dir={cache}',
                f'val_dataloader.dataset.cache_dir={cache}',
                'train_dataloader.num_workers=0',
                'val_dataloader.num_workers=0',
                'train_dataloader.persistent_workers=False',
                'val_dataloader.persistent_workers=False',
                'param_scheduler.0.end=2', 'param_scheduler.1.T_max=2',
                'default_hooks.checkpoint.save_best=None',
                'custom_hooks.1.warmup_epochs=0', 'custom_hooks.2.interval=2',
                'custom_hooks.3.num_batches=1', *extra]

    def run(command):
        return subprocess.run(command, cwd=str(tmp_path), capture_output=True,
                              text=True, timeout=900,
                              env=dict(os.environ, OMP_NUM_THREADS='1'))

    first = run(cmd(DEMO, 'train_cfg.max_epochs=1'))
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = osp.join(work_dir, 'epoch_1.pth')
    saved = read_checkpoint(ckpt)['meta'][META_KEY]
    assert saved['AtomShrinkHook']['target'] is None
    assert saved['train_cfg'] == {'max_epochs': 1}

    # the same config, only longer: the training length is a setting too
    refused = run(cmd(TARGET))
    assert refused.returncode == 1, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f'train.py: error: cannot resume {ckpt}: ')
    assert ('AtomShrinkHook.target: null in the checkpoint, '
            '{"flops": 1200000.0} now') in last
    assert 'train_cfg.max_epochs: 1 in the checkpoint, 2 now' in last
    assert f'--cfg-options {SWITCH}=True' in last
    assert sorted(f for f in os.listdir(work_dir) if f.endswith('.pth')) \
        == ['epoch_1.pth']  # nothing trained

    allowed = run(cmd(TARGET, f'{SWITCH}=True'))
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert 'with changed search settings' in allowed.stdout
    assert 'AtomShrinkHook.target: null in the checkpoint' in allowed.stdout
    final = read_checkpoint(osp.join(work_dir, 'epoch_2.pth'))
    assert final['meta'][META_KEY]['AtomShrinkHook']['target'] == \
        {'flops': 1.2e6}
