"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``."""
import gzip
import os
import os.path as osp
import shutil

from mmpretrain.datasets import FashionMNIST as _FashionMNIST

from .registry import DATASETS

DEBIAN_ROOT = '/usr/share/datasets/fashion-mnist'
INSTALL_HINT = ('install the Debian package with `sudo apt-get install '
                'dataset-fashion-mnist` (files under '
                f'{DEBIAN_ROOT}) or point data_root at the idx files')


def unpack_idx_files(data_root, cache_dir, names):
    """Return a directory holding the unpacked idx files ``names``.

    ``data_root`` may hold them unpacked (used as is) or as ``.gz`` (the
    Debian layout, read-only): those are decompressed once into
    ``cache_dir``.
    """
    if all(osp.isfile(osp.join(data_root, n)) for n in names):
        return data_root
    if not all(osp.isfile(osp.join(data_root, n + '.gz')) for n in names):
        raise FileNotFoundError(
            f'Fashion-MNIST not found in data_root={data_root!r}: '
            f'{INSTALL_HINT}.')
    os.makedirs(cache_dir, exist_ok=True)
    for name in names:
        dst = osp.join(cache_dir, name)
        if osp.isfile(dst):
            continue
        tmp = f'{dst}.{os.getpid()}.tmp'
        with gzip.open(osp.join(data_root, name + '.gz'), 'rb') as src, \
                open(tmp, 'wb') as out:
            shutil.copyfileobj(src, out)
        os.replace(tmp, dst)  # atomic: safe with several ranks
    return cache_dir


@DATASETS.register_module()
class FashionMNIST(_FashionMNIST):
    """mmpretrain's FashionMNIST reading the Debian package's files.

    Args:
        data_root (str): Directory with the idx files, unpacked or ``.gz``.
        cache_dir (str): Where ``.gz`` files are unpacked once.
        **kwargs: mmpretrain FashionMNIST arguments (``split``,
            ``pipeline``, ...). ``split='test'`` reads the test files
            (mmpretrain alone needs ``test_mode=True`` for that). Never
            downloads.
    """

    def __init__(self, data_root=DEBIAN_ROOT,
                 cache_dir='data/fashion-mnist', **kwargs):
        names = [n[:-3] for n, _ in self.train_list + self.test_list]
        root = unpack_idx_files(data_root, cache_dir, names)
        kwargs['download'] = False
        # mmpretrain's MNIST picks its files by test_mode, not by split:
        # split='test' alone would silently read the training images.
        kwargs.setdefault('test_mode', kwargs.get('split', 'train') == 'test')
        super().__init__(data_root=root, **kwargs)
