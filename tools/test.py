"""Test (and evaluate) a checkpoint; atomnas_mm's modules registered.

The interface is mmpretrain 1.2.0's ``tools/test.py`` with one difference:
a test run writes into the ``test/`` subfolder of the work_dir mmpretrain
would use (``--work-dir`` > the config's ``work_dir`` >
``work_dirs/<config name>``), never into that work_dir itself. A search's
work_dir and the exported config share a name, and mmengine dumps the
config to ``<work_dir>/<config file name>``: testing the export would
replace the search's own record of its config. A fixed subfolder (rather
than a timestamped one) is the same on every rank without synchronisation;
each test run still gets its own ``test/<timestamp>/`` log folder (with its
config in ``vis_data/config.py``) from mmengine. The CPU DDP workaround is
``atomnas_mm.utils.cpu_ddp_workaround``.
"""
import argparse
import os
import os.path as osp
import sys
import warnings
from copy import deepcopy

# Known and harmless (README, "Set-up"): mmengine 0.10.7 imports
# pkg_resources, which setuptools >= 67 deprecates.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TEST_SUBDIR = 'test'


def import_atomnas_mm():
    """Import atomnas_mm, from the repository if it is not installed."""
    try:
        import atomnas_mm  # noqa: F401
    except ImportError:
        sys.path.insert(0, REPO_ROOT)
        import atomnas_mm  # noqa: F401


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(
        description='MMPreTrain test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='the work_dir whose `test/` subfolder gets the logs and '
        'metrics (default: the config\'s work_dir, else '
        'work_dirs/<config name>)')
    parser.add_argument('--out', help='the file to output results.')
    parser.add_argument(
        '--out-item',
        choices=['metrics', 'pred'],
        help='To output whether metrics or predictions. '
        'Defaults to output predictions.')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='enable automatic-mixed-precision test')
    parser.add_argument(
        '--show-dir',
        help='directory where the visualization images will be saved.')
    parser.add_argument(
        '--show',
        action='store_true',
        help='whether to display the prediction results in a window.')
    parser.add_argument(
        '--interval',
        type=int,
        default=1,
        help='visualize per interval samples.')
    parser.add_argument(
        '--wait-time',
        type=float,
        default=2,
        help='display time of every window. (second)')
    parser.add_argument(
        '--no-pin-memory',
        action='store_true',
        help='whether to disable the pin_memory option in dataloaders.')
    parser.add_argument(
        '--tta',
        action='store_true',
        help='Whether to enable the Test-Time-Aug (TTA). If the config file '
        'has `tta_pipeline` and `tta_model` fields, use them to determine the '
        'TTA transforms and how to merge the TTA results. Otherwise, use flip '
        'TTA by averaging classification score.')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def merge_args(cfg, args):
    """Merge CLI arguments to config."""
    from mmengine.config import ConfigDict

    cfg.launcher = args.launcher

    # work_dir: CLI > segment in file > filename, as in mmpretrain; the test
    # run writes into its `test/` subfolder (see the module docstring).
    if args.work_dir is not None:
        work_dir = args.work_dir
    elif cfg.get('work_dir', None) is not None:
        work_dir = cfg.work_dir
    else:
        work_dir = osp.join('./work_dirs',
                            osp.splitext(osp.basename(args.config))[0])
    cfg.work_dir = osp.join(work_dir, TEST_SUBDIR)

    cfg.load_from = args.checkpoint

    # enable automatic-mixed-precision test
    if args.amp:
        cfg.test_cfg.fp16 = True

    # -------------------- visualization --------------------
    if args.show or (args.show_dir is not None):
        assert 'visualization' in cfg.default_hooks, \
            'VisualizationHook is not set in the `default_hooks` field of ' \
            'config. Please set `visualization=dict(type="VisualizationHook")`'

        cfg.default_hooks.visualization.enable = True
        cfg.default_hooks.visualization.show = args.show
        cfg.default_hooks.visualization.wait_time = args.wait_time
        cfg.default_hooks.visualization.out_dir = args.show_dir
        cfg.default_hooks.visualization.interval = args.interval

    # -------------------- TTA related args --------------------
    if args.tta:
        if 'tta_model' not in cfg:
            cfg.tta_model = dict(type='mmpretrain.AverageClsScoreTTA')
        if 'tta_pipeline' not in cfg:
            test_pipeline = cfg.test_dataloader.dataset.pipeline
            cfg.tta_pipeline = deepcopy(test_pipeline)
            flip_tta = dict(
                type='TestTimeAug',
                transforms=[
                    [
                        dict(type='RandomFlip', prob=1.),
                        dict(type='RandomFlip', prob=0.)
                    ],
                    [test_pipeline[-1]],
                ])
            cfg.tta_pipeline[-1] = flip_tta
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline

    # ----------------- Default dataloader args -----------------
    default_dataloader_cfg = ConfigDict(
        pin_memory=True,
        collate_fn=dict(type='default_collate'),
    )

    def set_default_dataloader_cfg(cfg, field):
        if cfg.get(field, None) is None:
            return
        dataloader_cfg = deepcopy(default_dataloader_cfg)
        dataloader_cfg.update(cfg[field])
        cfg[field] = dataloader_cfg
        if args.no_pin_memory:
            cfg[field]['pin_memory'] = False

    set_default_dataloader_cfg(cfg, 'test_dataloader')

    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    return cfg


def main(argv=None):
    args = parse_args(argv)

    if args.out is None and args.out_item is not None:
        raise ValueError('Please use `--out` argument to specify the '
                         'path of the output file before using `--out-item`.')

    import_atomnas_mm()
    import mmengine
    from mmengine.config import Config
    from mmengine.evaluator import DumpResults
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    cfg = Config.fromfile(args.config)
    cfg = merge_args(cfg, args)
    cfg.launcher = args.launcher  # what cpu_ddp_workaround reads
    from atomnas_mm.datasets import check_data
    from atomnas_mm.utils import cpu_ddp_workaround
    check_data(cfg, ('test', ))
    cpu_ddp_workaround(cfg)

    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)

    if args.out and args.out_item in ['pred', None]:
        runner.test_evaluator.metrics.append(
            DumpResults(out_file_path=args.out))

    metrics = runner.test()

    if args.out and args.out_item == 'metrics':
        mmengine.dump(metrics, args.out)
    return metrics


if __name__ == '__main__':
    try:
        import_atomnas_mm()
        from atomnas_mm.datasets import DatasetNotFoundError
    except ImportError:  # the traceback says what is missing
        DatasetNotFoundError = ()
    try:
        main()
    except DatasetNotFoundError as e:
        sys.exit(f'{osp.basename(sys.argv[0])}: error: {e}')
