"""The Fashion-MNIST demo on real data (Debian package dataset-fashion-mnist)."""
import os.path as osp
import subprocess
import sys

import pytest

from mmengine.config import Config

from atomnas_mm.datasets import (DEBIAN_ROOT, DatasetNotFoundError,
                                 FashionMNIST, check_data)
from harness import demo_cmd

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs/demo/atomnas_fashion_mnist.py')
needs_data = pytest.mark.skipif(
    not osp.isdir(DEBIAN_ROOT),
    reason='needs the Debian package dataset-fashion-mnist '
    '(tools/install.sh installs it when apt is available)')


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match='apt-get install dataset-fashion-mnist'):
        FashionMNIST(data_root=str(tmp_path), cache_dir=str(tmp_path / 'c'))
    cfg = Config.fromfile(CONFIG)
    cfg.val_dataloader.dataset.data_root = str(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r'^val_dataloader\.dataset:'
                       r'.*apt-get install dataset-fashion-mnist'):
        check_data(cfg)
    cfg.train_dataloader.dataset = dict(
        type='RepeatDataset', times=2,
        dataset=dict(type='CustomDataset', data_root=str(tmp_path / 'no')))
    with pytest.raises(DatasetNotFoundError, match=r'^train_dataloader\.'
                       r'dataset\.dataset\.data_root: .*/no\b'):
        check_data(cfg)


@pytest.mark.slow
@pytest.mark.parametrize('tool', ['train', 'test'])
def test_missing_dataset_is_the_first_thing_said(tmp_path, tool):
    """The message comes before the Runner's environment and config dump:
    nothing else is printed (but third-party warnings), nothing written."""
    args = [CONFIG] + (['none.pth'] if tool == 'test' else []) + [
        '--work-dir', str(tmp_path / 'work'), '--cfg-options'] + [
        f'{split}_dataloader.dataset.data_root={tmp_path}'
        for split in ('train', 'val', 'test')]
    out = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', f'{tool}.py')] + args,
        cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    said = [line for line in (out.stdout + out.stderr).splitlines()
            if 'Warning' not in line and not line.startswith('  ')]
    assert len(said) == 1, said
    assert said[0].startswith(f'{tool}.py: error: ')
    assert 'apt-get install dataset-fashion-mnist' in said[0]
    assert not (tmp_path / 'work').exists()


@needs_data
def test_dataset_reads_debian_files(tmp_path):
    ds = FashionMNIST(cache_dir=str(tmp_path), split='test', pipeline=[])
    assert len(ds) == 10000  # the test files, not the 60k training ones
    item = ds[0]
    assert item['img'].shape == (28, 28) and 0 <= item['gt_label'] < 10


@needs_data
@pytest.mark.slow
def test_demo_searches_and_shrinks(tmp_path):
    """1024 real images, 2 epochs: the penalty kills atoms, the hook shrinks.

    A strong penalty and a loose threshold make atoms die within 64
    iterations; the demo's own settings need a few thousand.
    """
    work_dir = tmp_path / 'work'
    cmd = demo_cmd(work_dir, tmp_path / 'data', iters_per_epoch=32,
                   val_images=256, warmup_iters=5, options=(
                       'custom_hooks.0.momentum=0.5', 'custom_hooks.1.rho=0.05',
                       'custom_hooks.1.warmup_epochs=0',
                       'custom_hooks.2.interval=8',
                       'custom_hooks.2.threshold=0.3',
                       'custom_hooks.2.min_removed_flops=0',
                       'custom_hooks.3.num_batches=2'))
    out = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert 'AtomShrinkHook: removed' in log
    assert 'accuracy/top1' in log
    for name in ('searched_arch.json', 'arch.png', 'flops.png',
                 'epoch_2.pth'):
        assert (work_dir / name).exists(), name
    # The pictures also went to the configured vis backend (LocalVisBackend).
    sent = {p.name.split('_')[0]
            for p in work_dir.glob('*/vis_data/vis_image/*.png')}
    assert sent == {'arch', 'flops'}
