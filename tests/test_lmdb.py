"""tools/dataset_converters/imagenet_to_lmdb.py and reading its LMDB."""
import importlib.util
import os.path as osp
import re
import subprocess
import sys

import numpy as np
import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope
from PIL import Image

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(ROOT, 'tools', 'dataset_converters', 'imagenet_to_lmdb.py')
DATASET_CFG = osp.join(ROOT, 'configs', '_base_', 'datasets',
                       'imagenet_bs64_atomnas.py')
CLASSES = ('n001', 'n002')


def load_tool():
    spec = importlib.util.spec_from_file_location('imagenet_to_lmdb', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def tool():
    return load_tool()


def random_jpeg(path, rng):
    size = tuple(int(s) for s in rng.integers(20, 48, size=2))
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format='JPEG', quality=90)


def make_imagenet(root, rng, with_meta=True):
    """2 classes x 3 train images, 4 flat val images, meta/*.txt lists."""
    train, val = [], []
    for label, cls in enumerate(CLASSES):
        (root / 'train' / cls).mkdir(parents=True)
        for i in range(3):
            rel = f'{cls}/{cls}_{i}.JPEG'
            random_jpeg(root / 'train' / rel, rng)
            train.append(f'{rel} {label}')
    (root / 'val').mkdir()
    for i in range(4):
        rel = f'val_{i}.JPEG'
        random_jpeg(root / 'val' / rel, rng)
        val.append(f'{rel} {i % 2}')
    if with_meta:
        (root / 'meta').mkdir()
        # Not in sorted order: the list decides the order and the labels.
        (root / 'meta' / 'train.txt').write_text('\n'.join(train[::-1]) + '\n')
        (root / 'meta' / 'val.txt').write_text('\n'.join(val) + '\n')
    return train, val


def build_imagenet(data_root, split, backend_args=None, scan=False):
    """mmpretrain's ImageNet, or CustomDataset scanning data_root/split."""
    from mmpretrain.datasets import CustomDataset, ImageNet
    load = dict(type='LoadImageFromFile', backend_args=backend_args)
    if scan:
        return CustomDataset(data_root=data_root, data_prefix=split,
                             pipeline=[load])
    return ImageNet(data_root=data_root, split=split, pipeline=[load])


def assert_same_images(data_root, split, db_path, scan=False):
    """Every sample decodes to the same pixels from the LMDB and the files."""
    lmdb_set = build_imagenet(data_root, split,
                              dict(backend='lmdb', db_path=db_path), scan)
    file_set = build_imagenet(data_root, split, scan=scan)
    assert len(lmdb_set) == len(file_set) > 0
    for i in range(len(file_set)):
        a, b = lmdb_set[i], file_set[i]
        assert a['img_path'] == b['img_path']
        assert a['gt_label'] == b['gt_label']
        assert a['img'].dtype == np.uint8 and a['img'].ndim == 3
        np.testing.assert_array_equal(a['img'], b['img'])
    return lmdb_set


def test_convert_with_ann_files(tool, tmp_path):
    src = tmp_path / 'imagenet'
    train, val = make_imagenet(src, np.random.default_rng(0))
    out = str(tmp_path / 'imagenet.lmdb')
    counts = tool.main([str(src), out])
    assert counts == {'train': 6, 'val': 4}
    # The lists travel with the LMDB, verbatim.
    for split in ('train', 'val'):
        assert (tmp_path / 'imagenet.lmdb' / 'meta' / f'{split}.txt'
                ).read_text() == (src / 'meta' / f'{split}.txt').read_text()
    # Keys are the paths the dataset builds from data_root (SRC_ROOT).
    dataset = assert_same_images(str(src), 'train', out)
    assert [dataset[i]['gt_label'] for i in range(6)] == [1, 1, 1, 0, 0, 0]
    assert_same_images(str(src), 'val', out)


def test_ann_file_option_and_self_contained_lmdb(tool, tmp_path):
    """Only meta/train.txt, keyed under the LMDB dir used as data_root."""
    src = tmp_path / 'imagenet'
    make_imagenet(src, np.random.default_rng(1))
    out = str(tmp_path / 'in.lmdb')
    counts = tool.main([str(src), out, '--ann-file', 'meta/train.txt',
                        '--key-root', out, '--map-size', '64M'])
    assert counts == {'train': 6}
    assert not osp.exists(osp.join(out, 'meta', 'val.txt'))
    # data_root = the LMDB dir: lists from OUT/meta, images from the LMDB.
    lmdb_set = build_imagenet(out, 'train', dict(backend='lmdb', db_path=out))
    file_set = build_imagenet(str(src), 'train')
    assert len(lmdb_set) == len(file_set) == 6
    for i in range(6):
        assert lmdb_set[i]['gt_label'] == file_set[i]['gt_label']
        np.testing.assert_array_equal(lmdb_set[i]['img'], file_set[i]['img'])


def test_folder_scan_writes_lists(tool, tmp_path):
    """Without meta/, labels follow mmpretrain's sorted-folder scan."""
    src = tmp_path / 'imagenet'
    make_imagenet(src, np.random.default_rng(2), with_meta=False)
    out = str(tmp_path / 'scan.lmdb')
    assert tool.main([str(src), out, '--splits', 'train']) == {'train': 6}
    lines = (tmp_path / 'scan.lmdb' / 'meta' / 'train.txt').read_text()
    assert lines.splitlines() == [
        f'{cls}/{cls}_{i}.JPEG {label}' for label, cls in enumerate(CLASSES)
        for i in range(3)]
    # The dataset scans the folder itself (no meta/ there): same keys.
    dataset = assert_same_images(str(src), 'train', out, scan=True)
    assert dataset.CLASSES == CLASSES


def test_errors_name_the_culprit(tool, tmp_path):
    src = tmp_path / 'imagenet'
    make_imagenet(src, np.random.default_rng(3))
    with open(src / 'meta' / 'val.txt', 'a') as f:
        f.write('missing.JPEG 0\n')
    with pytest.raises(FileNotFoundError, match='val.txt'):
        tool.main([str(src), str(tmp_path / 'a.lmdb'), '--splits', 'val'])
    tool.main([str(src), str(tmp_path / 'b.lmdb'), '--splits', 'train'])
    with pytest.raises(FileExistsError, match='b.lmdb'):
        tool.main([str(src), str(tmp_path / 'b.lmdb'), '--splits', 'train'])
    with pytest.raises(FileNotFoundError, match='SRC_ROOT'):
        tool.main([str(tmp_path / 'nowhere'), str(tmp_path / 'c.lmdb')])
    with pytest.raises(SystemExit):
        tool.parse_args(['a', 'b', '--map-size', 'lots'])
    assert tool.parse_size('1.5G') == 3 * 2**29


def test_dataset_config_switches_with_one_setting(tool, tmp_path):
    """The shipped ImageNet config reads the LMDB once ``backend_args`` is set.

    The config must define ``backend_args = None`` next to ``data_root`` and
    pass it to ``LoadImageFromFile`` in both pipelines; setting it to
    ``dict(backend='lmdb', db_path=data_root + '.lmdb')`` is the switch.
    """
    text = open(DATASET_CFG).read()
    assert re.search(r'^backend_args = None$', text, re.M), (
        f'{DATASET_CFG} has no line "backend_args = None" to switch to LMDB')
    src = tmp_path / 'imagenet'
    make_imagenet(src, np.random.default_rng(4))
    tool.main([str(src), str(tmp_path / 'imagenet.lmdb')])

    def load(lmdb):
        new = re.sub(r"^data_root = .*$", f'data_root = {str(src)!r}', text,
                     flags=re.M)
        if lmdb:
            new = re.sub(r'^backend_args = None$', "backend_args = dict("
                         "backend='lmdb', db_path=data_root + '.lmdb')", new,
                         flags=re.M)
        path = tmp_path / f'cfg_{lmdb}.py'
        path.write_text(new)
        return Config.fromfile(str(path))

    init_default_scope('mmpretrain')
    from mmpretrain.registry import DATASETS
    lmdb_cfg, file_cfg = load(True), load(False)
    want = dict(backend='lmdb', db_path=str(src) + '.lmdb')
    for pipeline in (lmdb_cfg.train_pipeline, lmdb_cfg.test_pipeline,
                     lmdb_cfg.train_dataloader.dataset.pipeline,
                     lmdb_cfg.val_dataloader.dataset.pipeline):
        assert pipeline[0]['type'] == 'LoadImageFromFile'
        assert pipeline[0]['backend_args'] == want
    # The deterministic test pipeline gives the same tensors either way.
    lmdb_set = DATASETS.build(lmdb_cfg.val_dataloader.dataset)
    file_set = DATASETS.build(file_cfg.val_dataloader.dataset)
    assert len(lmdb_set) == len(file_set) == 4
    for i in range(4):
        a, b = lmdb_set[i]['inputs'], file_set[i]['inputs']
        assert tuple(a.shape) == (3, 224, 224)
        assert (a == b).all()


@pytest.mark.slow
def test_cli_help():
    out = subprocess.run([sys.executable, TOOL, '--help'], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    for option in ('SRC_ROOT', 'OUT.lmdb', '--ann-file', '--map-size',
                   '--key-root'):
        assert option in out
