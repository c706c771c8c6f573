"""The shipped ImageNet configs build their datasets on a tiny ImageNet folder."""
import glob
import json
import os.path as osp

import numpy as np
import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmpretrain.registry import DATASETS
from PIL import Image

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs/atomnas_*.py')) +
                 glob.glob(osp.join(ROOT, 'configs/retrain/*.py')))


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
    """train/<wnid>/*.JPEG, val/*.JPEG and meta/{train,val}.txt."""
    root = tmp_path_factory.mktemp('imagenet')
    rng = np.random.default_rng(0)
    lists = {'train': [], 'val': []}
    for label, wnid in enumerate(['n01440764', 'n01443537']):
        (root / 'train' / wnid).mkdir(parents=True)
        for i in range(2):
            rel = f'{wnid}/{wnid}_{i}.JPEG'
            img = rng.integers(0, 255, (40 + 9 * i, 60, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / 'train' / rel)
            lists['train'].append(f'{rel} {label}')
        (root / 'val').mkdir(exist_ok=True)
        rel = f'ILSVRC2012_val_{label:08d}.JPEG'
        Image.fromarray(rng.integers(0, 255, (70, 50, 3), dtype=np.uint8)
                        ).save(root / 'val' / rel)
        lists['val'].append(f'{rel} {label}')
    (root / 'meta').mkdir()
    for split, lines in lists.items():
        (root / 'meta' / f'{split}.txt').write_text('\n'.join(lines) + '\n')
    return str(root)


BUILT = {}  # dataset settings (JSON) -> what the built dataset holds


def built(ds_cfg):
    """Length, labels, the last item's input shape and label of the dataset
    ``ds_cfg``; configs with the same dataset settings build it once."""
    key = json.dumps(ds_cfg.to_dict(), sort_keys=True, default=str)
    if key not in BUILT:
        dataset = DATASETS.build(ds_cfg)
        n = len(dataset)
        item = dataset[n - 1]
        BUILT[key] = (n, [dataset.get_data_info(i)['gt_label']
                          for i in range(n)],
                      tuple(item['inputs'].shape),
                      int(item['data_samples'].gt_label))
    return BUILT[key]


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_imagenet_datasets_build(path, imagenet):
    cfg = Config.fromfile(path)
    init_default_scope(cfg.default_scope)
    for loader, n, labels in (('train_dataloader', 4, [0, 0, 1, 1]),
                              ('val_dataloader', 2, [0, 1])):
        ds_cfg = cfg[loader].dataset
        assert ds_cfg.type == 'ImageNet' and ds_cfg.data_root == \
            'data/imagenet'
        ds_cfg.data_root = imagenet
        assert built(ds_cfg) == (n, labels, (3, 224, 224), labels[-1])
