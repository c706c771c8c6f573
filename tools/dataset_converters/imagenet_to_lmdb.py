"""Pack an ImageNet-style folder into an LMDB for mmengine's LmdbBackend.

mmengine's ``LmdbBackend.get(filepath)`` uses the path string exactly as the
dataset builds it as the key. mmpretrain's ``ImageNet``/``CustomDataset``
build ``osp.join(data_root, data_prefix, rel_path)`` (e.g.
``data/imagenet/train/n01440764/x.JPEG``), so this tool stores every image's
raw file bytes (no re-encoding) under ``osp.join(KEY_ROOT, prefix, rel)``,
where ``KEY_ROOT`` defaults to ``SRC_ROOT`` as typed. It must be the very
string the config uses as ``data_root`` (``data/imagenet`` and
``./data/imagenet`` are different keys): pass ``--key-root`` otherwise.

The annotation lists (``rel/path.JPEG label``) are copied, or written for
splits that have none, to ``OUT/meta/<split>.txt``.

Usage::

    python tools/dataset_converters/imagenet_to_lmdb.py \\
        data/imagenet data/imagenet.lmdb

then, in ``configs/_base_/datasets/imagenet_bs64_atomnas.py``, one setting
read by ``LoadImageFromFile`` in both pipelines::

    backend_args = dict(backend='lmdb', db_path=data_root + '.lmdb')

The annotation lists are still read from ``data_root/meta``. For an LMDB
that needs no image folder, make the LMDB directory the data root:
``--key-root data/imagenet.lmdb`` with ``data_root = 'data/imagenet.lmdb'``
and ``db_path=data_root`` (its ``meta/`` holds the lists).
"""
import argparse
import os
import os.path as osp
import re
import shutil

from mmengine.utils import ProgressBar

SPLITS = ('train', 'val', 'test')
# mmpretrain's ImageNet.IMG_EXTENSIONS (matched case-insensitively).
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif')
_SIZE = re.compile(r'^(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?$', re.IGNORECASE)
_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
PAGE = 4096


def parse_size(text):
    """Bytes from ``'1073741824'``, ``'512M'``, ``'1.5G'`` or ``'2TiB'``."""
    match = _SIZE.match(str(text).strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f'--map-size: expected bytes or a size like 200G, got {text!r}')
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def read_ann_file(path):
    """``[(rel_path, line)]`` of an annotation list ``rel/path [label]``."""
    entries = []
    with open(path) as f:
        for num, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(' ', 1)
            rel = parts[0] if len(parts) == 2 and parts[1].lstrip(
                '-').isdigit() else line
            if osp.isabs(rel):
                raise ValueError(f'{path}:{num}: image paths must be relative '
                                 f'to the split folder, got {rel!r}')
            entries.append((rel, line))
    return entries


def scan_folder(img_dir, with_label):
    """Entries of a folder the way mmpretrain's dataset scans it.

    With labels, ``img_dir/<class>/**/<img>`` with classes numbered in sorted
    order (mmpretrain's ``find_folders``); without, every image below it.
    """
    from mmpretrain.datasets.custom import find_folders, get_samples

    def is_valid(name):
        return name.lower().endswith(IMG_EXTENSIONS)

    if with_label:
        _, folder_to_idx = find_folders(img_dir)
        samples, _ = get_samples(img_dir, folder_to_idx, is_valid)
        entries = [(rel, f'{rel} {label}') for rel, label in samples]
    else:
        samples, _ = get_samples(img_dir, None, is_valid)
        entries = [(rel, rel) for rel in samples]
    if not entries:
        raise FileNotFoundError(f'no image ({", ".join(IMG_EXTENSIONS)}) '
                                f'found below {img_dir}')
    return entries


def collect_splits(src_root, ann_file=None, data_prefix=None, splits=None):
    """Describe what to pack: ``[dict(name, prefix, ann_file, entries)]``.

    Args:
        src_root (str): The ImageNet-style root (``train/``, ``meta/``...).
        ann_file (str, optional): One annotation list (relative to
            ``src_root`` or absolute) to pack instead of whole splits.
        data_prefix (str, optional): Folder (relative to ``src_root``) of the
            paths in ``ann_file``; defaults to the list's stem when such a
            folder exists (``meta/train.txt`` -> ``train``), else ``''``.
        splits (list[str], optional): Splits to pack without ``ann_file``;
            defaults to those of ``train``/``val``/``test`` found.
    """
    if not osp.isdir(src_root):
        raise FileNotFoundError(f'SRC_ROOT: {src_root} is not a directory')
    if ann_file is not None:
        path = osp.join(src_root, ann_file)  # an absolute ann_file wins
        if not osp.isfile(path):
            raise FileNotFoundError(f'--ann-file: {path} does not exist')
        name = osp.splitext(osp.basename(path))[0]
        if data_prefix is None:
            data_prefix = name if osp.isdir(osp.join(src_root, name)) else ''
        return [dict(name=name, prefix=data_prefix, ann_file=path,
                     entries=read_ann_file(path))]
    if splits is None:
        splits = [s for s in SPLITS if osp.isdir(osp.join(src_root, s))]
        if not splits:
            raise FileNotFoundError(f'SRC_ROOT: {src_root} has none of the '
                                    f'split folders {SPLITS}')
    result = []
    for split in splits:
        img_dir = osp.join(src_root, split)
        if not osp.isdir(img_dir):
            raise FileNotFoundError(f'--splits: {img_dir} does not exist')
        path = osp.join(src_root, 'meta', f'{split}.txt')
        if osp.isfile(path):
            entries = read_ann_file(path)
        else:
            path, entries = None, scan_folder(img_dir, split != 'test')
        result.append(dict(name=split, prefix=split, ann_file=path,
                           entries=entries))
    return result


def write_meta(out, split):
    """Copy (or write) ``split``'s annotation list to ``out/meta``."""
    meta_dir = osp.join(out, 'meta')
    os.makedirs(meta_dir, exist_ok=True)
    dst = osp.join(meta_dir, f'{split["name"]}.txt')
    if split['ann_file'] is not None:
        shutil.copyfile(split['ann_file'], dst)
    else:
        with open(dst, 'w') as f:
            f.writelines(f'{line}\n' for _, line in split['entries'])
    return dst


def lmdb_key(key_root, prefix, rel):
    """The key mmengine's LmdbBackend looks up for this image (ASCII)."""
    key = osp.join(key_root, prefix, rel)
    try:
        return key.encode('ascii')
    except UnicodeEncodeError:
        raise ValueError(f'LmdbBackend keys must be ASCII; cannot store '
                         f'{key!r}') from None


def check_images(src_root, splits):
    """Fail early on a missing image; return the LMDB pages they need."""
    pages = 0
    for split in splits:
        for rel, _ in split['entries']:
            path = osp.join(src_root, split['prefix'], rel)
            if not osp.isfile(path):
                where = split['ann_file'] or 'the folder scan'
                raise FileNotFoundError(f'{path} (listed in {where}) does not '
                                        f'exist')
            pages += -(-osp.getsize(path) // PAGE) + 1
    return pages


def convert(src_root, out, key_root=None, ann_file=None, data_prefix=None,
            splits=None, map_size=None, commit_interval=1000):
    """Pack images into the LMDB ``out``; return ``{split: num_images}``.

    See the module docstring for the key scheme; arguments as on the
    command line (``map_size`` in bytes, estimated when None).
    """
    import lmdb

    if osp.exists(osp.join(out, 'data.mdb')):
        raise FileExistsError(f'OUT: {out} already holds an LMDB; remove it '
                              f'or choose another path')
    key_root = src_root if key_root is None else key_root
    todo = collect_splits(src_root, ann_file, data_prefix, splits)
    pages = check_images(src_root, todo)
    if map_size is None:  # twice the pages + 64 MiB: the file is sparse
        map_size = 2 * pages * PAGE + 64 * 2**20
    os.makedirs(out, exist_ok=True)
    env = lmdb.open(out, map_size=map_size, subdir=True, lock=True)
    counts = {}
    try:
        for split in todo:
            counts[split['name']] = _put_split(env, src_root, key_root, split,
                                               commit_interval)
            write_meta(out, split)
    finally:
        env.close()
    return counts


def _put_split(env, src_root, key_root, split, commit_interval):
    """Write one split's images (raw file bytes) in batched transactions."""
    first = lmdb_key(key_root, split['prefix'], split['entries'][0][0])
    print(f'packing {len(split["entries"])} images of {split["name"]!r}, '
          f'first key {first.decode()}')
    bar = ProgressBar(len(split['entries']))
    txn = env.begin(write=True)
    try:
        for i, (rel, _) in enumerate(split['entries'], 1):
            path = osp.join(src_root, split['prefix'], rel)
            with open(path, 'rb') as f:
                value = f.read()
            key = lmdb_key(key_root, split['prefix'], rel)
            if not txn.put(key, value, overwrite=False):
                raise ValueError(f'{split["ann_file"]}: image {rel!r} is '
                                 f'listed twice')
            if i % commit_interval == 0:
                txn.commit()
                txn = env.begin(write=True)
            bar.update()
        txn.commit()
    except BaseException:
        txn.abort()
        raise
    print()
    return len(split['entries'])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Pack an ImageNet-style folder into an LMDB readable by '
        "mmengine's LmdbBackend (backend_args=dict(backend='lmdb', "
        'db_path=OUT)).')
    parser.add_argument('src_root', metavar='SRC_ROOT',
                        help='folder with train/, val/ (and meta/*.txt)')
    parser.add_argument('out', metavar='OUT.lmdb', help='LMDB directory')
    parser.add_argument('--ann-file', help='pack only the images of this '
                        'list (relative to SRC_ROOT or absolute)')
    parser.add_argument('--data-prefix', help="folder of --ann-file's paths "
                        'relative to SRC_ROOT (default: the list name if such '
                        'a folder exists, e.g. train for meta/train.txt)')
    parser.add_argument('--splits', nargs='+', choices=SPLITS,
                        help='splits to pack (default: all found)')
    parser.add_argument('--key-root', help='the data_root string of the '
                        'config (default: SRC_ROOT as typed)')
    parser.add_argument('--map-size', type=parse_size,
                        help='LMDB map size, e.g. 200G (default: estimated)')
    parser.add_argument('--commit-interval', type=int, default=1000,
                        help='images per write transaction')
    args = parser.parse_args(argv)
    if args.commit_interval < 1:
        parser.error('--commit-interval must be >= 1')
    if args.ann_file is not None and args.splits is not None:
        parser.error('--ann-file and --splits are exclusive')
    return args


def main(argv=None):
    args = parse_args(argv)
    counts = convert(args.src_root, args.out, key_root=args.key_root,
                     ann_file=args.ann_file, data_prefix=args.data_prefix,
                     splits=args.splits, map_size=args.map_size,
                     commit_interval=args.commit_interval)
    key_root = args.src_root if args.key_root is None else args.key_root
    print(f'wrote {counts} to {args.out} (lists in '
          f'{osp.join(args.out, "meta")}); in the config use\n'
          f"  data_root = '{key_root}'\n"
          f"  backend_args = dict(backend='lmdb', db_path='{args.out}')")
    return counts


if __name__ == '__main__':
    main()
