"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, and a
check that a config's datasets are on disk before a Runner is built."""
import gzip
import os
import os.path as osp
import shutil
import warnings

from mmpretrain.datasets import FashionMNIST as _FashionMNIST

from .registry import DATASETS

DEBIAN_ROOT = '/usr/share/datasets/fashion-mnist'
INSTALL_HINT = ('install the Debian package with `sudo apt-get install '
                'dataset-fashion-mnist` (files under '
                f'{DEBIAN_ROOT}) or point data_root at the idx files')


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not on disk; the message says how to get them."""


def check_idx_files(data_root, names, where='FashionMNIST'):
    """Whether ``data_root`` holds the idx files unpacked (True) or gzipped.

    Raises:
        DatasetNotFoundError: Saying how to install the data.
    """
    if all(osp.isfile(osp.join(data_root, n)) for n in names):
        return True
    if all(osp.isfile(osp.join(data_root, n + '.gz')) for n in names):
        return False
    raise DatasetNotFoundError(
        f'{where}: Fashion-MNIST not found in data_root={data_root!r}: '
        f'{INSTALL_HINT}.')


def unpack_idx_files(data_root, cache_dir, names):
    """Return a directory holding the unpacked idx files ``names``.

    ``data_root`` may hold them unpacked (used as is) or as ``.gz`` (the
    Debian layout, read-only): those are decompressed once into
    ``cache_dir`` (about 53 MB for Fashion-MNIST).
    """
    if check_idx_files(data_root, names):
        return data_root
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
        root = unpack_idx_files(data_root, cache_dir, self.idx_files())
        kwargs['download'] = False
        # mmpretrain's MNIST picks its files by test_mode, not by split:
        # split='test' alone would silently read the training images.
        kwargs.setdefault('test_mode', kwargs.get('split', 'train') == 'test')
        super().__init__(data_root=root, **kwargs)

    def load_data_list(self):
        # mmpretrain's MNIST reads the idx files with torch.from_numpy on a
        # read-only buffer (one UserWarning) and converts every label with
        # np.array(tensor), which numpy 2 answers with a DeprecationWarning
        # per image (70,000 for Fashion-MNIST). Both are harmless here.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                'ignore', message='The given NumPy array is not writable',
                category=UserWarning)
            warnings.filterwarnings(
                'ignore', message="__array__ implementation doesn't accept",
                category=DeprecationWarning)
            return super().load_data_list()

    @classmethod
    def idx_files(cls):
        """Names of the four unpacked idx files."""
        return [n[:-3] for n, _ in cls.train_list + cls.test_list]


def _dataset_cfgs(cfg, where):
    """``(field, dataset config)`` of ``cfg`` and the datasets it wraps."""
    if not hasattr(cfg, 'get'):
        return []
    found = [(where, cfg)]
    if hasattr(cfg.get('dataset'), 'get'):
        found += _dataset_cfgs(cfg['dataset'], f'{where}.dataset')
    for i, sub in enumerate(cfg.get('datasets') or []):
        found += _dataset_cfgs(sub, f'{where}.datasets.{i}')
    return found


def _is_local(path, dataset_cfg):
    backend = (dataset_cfg.get('backend_args') or {}).get('backend', 'local')
    return isinstance(path, str) and path and '://' not in path and \
        backend in ('local', 'lmdb')


def check_data(cfg, splits=('train', 'val', 'test')):
    """Check that the datasets of a config are on disk, before building.

    A Runner prints its environment and the whole config (hundreds of lines)
    before it builds a dataloader; call this first, so that a missing
    dataset is the first and only thing a person reads. Checks
    ``atomnas_mm.FashionMNIST`` for its idx files, and every other dataset
    (and the datasets inside wrappers) for a local ``data_root`` that does
    not exist, unless it downloads.

    Args:
        cfg (Config | dict): The config.
        splits (Sequence[str]): Which ``<split>_dataloader`` to check.

    Raises:
        DatasetNotFoundError: Naming the config field and the path.
    """
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not hasattr(loader, 'get') or loader.get('dataset') is None:
            continue
        for field, dataset in _dataset_cfgs(loader['dataset'],
                                            f'{split}_dataloader.dataset'):
            kind = dataset.get('type')
            if kind in ('atomnas_mm.FashionMNIST', FashionMNIST):
                check_idx_files(dataset.get('data_root', DEBIAN_ROOT),
                                FashionMNIST.idx_files(), field)
                continue
            root = dataset.get('data_root')
            if _is_local(root, dataset) and not dataset.get('download') \
                    and not osp.exists(root):
                raise DatasetNotFoundError(
                    f'{field}.data_root: {root!r} does not exist (relative '
                    f'paths start at {os.getcwd()}); put the dataset there '
                    f'or set {field}.data_root')
