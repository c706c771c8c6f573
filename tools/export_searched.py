"""Export the network an AtomNAS search ended with.

Writes ``arch.json``, a standalone config without the search hooks and the
EMA weights to ``--out``; the work is done by :func:`atomnas_mm.export.export`
(see its module docstring for what each file holds).

Example::

    python tools/export_searched.py work_dirs/atomnas_fashion_mnist \
        --out export/demo
    python tools/test.py export/demo/atomnas_fashion_mnist.py \
        export/demo/atomnas_fashion_mnist.pth
"""
import argparse
import os.path as osp
import sys
import warnings

# Known and harmless (README, "Set-up"): mmengine 0.10.7 imports
# pkg_resources, which setuptools >= 67 deprecates.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)


def import_atomnas_mm():
    """Import atomnas_mm, from the repository if it is not installed."""
    try:
        import atomnas_mm  # noqa: F401
    except ImportError:
        sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
        import atomnas_mm  # noqa: F401


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export the net of an AtomNAS search run')
    parser.add_argument('src', metavar='WORK_DIR_OR_CHECKPOINT',
                        help='search work_dir (uses `last_checkpoint`) or a '
                        'checkpoint file')
    parser.add_argument('--out', required=True, help='output directory')
    parser.add_argument('--name', help='file name of the config/checkpoint '
                        '(default: the search config\'s name, else the '
                        'work_dir\'s)')
    group = parser.add_mutually_exclusive_group()
    group.add_argument('--config', help='search config to derive from '
                       '(default: the one stored in the checkpoint)')
    group.add_argument('--inherit', help='config to inherit (absolute path) '
                       'with only the arch replaced, e.g. '
                       'configs/retrain/atomnas-a_in1k.py')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import_atomnas_mm()
    from atomnas_mm.export import export
    paths = export(args.src, args.out, args.name, args.config, args.inherit)
    for kind, path in paths.items():
        print(f'{kind}: {path}')
    return paths


if __name__ == '__main__':
    main()
