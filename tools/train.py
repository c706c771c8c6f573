"""Train a model with mmengine's Runner; atomnas_mm's modules registered.

The interface is mmpretrain 1.2.0's ``tools/train.py``. It runs from any
directory: the repository root is put on ``sys.path`` only when atomnas_mm
is not importable. With a distributed launcher on a machine without CUDA it
applies the CPU DDP workaround (``atomnas_mm.utils.cpu_ddp_workaround``).
Before the Runner prints its environment and config, the datasets are
checked (``atomnas_mm.datasets.check_data``): a missing dataset stops the
run with one line saying how to get it.
"""
import argparse
import errno
import logging
import os
import os.path as osp
import sys
import warnings
from copy import deepcopy

# Known and harmless (README, "Set-up"): mmengine 0.10.7 imports
# pkg_resources, which setuptools >= 67 deprecates (printed twice a run).
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def import_atomnas_mm():
    """Import atomnas_mm (registries, checkpoint allowlist).

    The repository root is inserted into ``sys.path`` only if the package is
    not installed, so an installed atomnas_mm takes precedence.
    """
    try:
        import atomnas_mm  # noqa: F401
    except ImportError:
        sys.path.insert(0, REPO_ROOT)
        import atomnas_mm  # noqa: F401


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='If specify checkpoint path, resume from it, while if not '
        'specify, try to auto resume from the latest checkpoint '
        'in the work directory.')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='enable automatic-mixed-precision training')
    parser.add_argument(
        '--no-validate',
        action='store_true',
        help='whether not to evaluate the checkpoint during training')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='whether to auto scale the learning rate according to the '
        'actual batch size and the original batch size.')
    parser.add_argument(
        '--no-pin-memory',
        action='store_true',
        help='whether to disable the pin_memory option in dataloaders.')
    parser.add_argument(
        '--no-persistent-workers',
        action='store_true',
        help='whether to disable the persistent_workers option in dataloaders.'
    )
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
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes `--local-rank` (torch >= 2.0),
    # torchrun sets the LOCAL_RANK environment variable instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def merge_args(cfg, args):
    """Merge CLI arguments to config."""
    from mmengine.config import ConfigDict

    if args.no_validate:
        cfg.val_cfg = None
        cfg.val_dataloader = None
        cfg.val_evaluator = None

    cfg.launcher = args.launcher

    # work_dir is determined in this priority: CLI > segment in file > filename
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])

    # enable automatic-mixed-precision training
    if args.amp is True:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')

    # resume training
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    # enable auto scale learning rate
    if args.auto_scale_lr:
        cfg.auto_scale_lr.enable = True

    # set dataloader args
    default_dataloader_cfg = ConfigDict(
        pin_memory=True,
        persistent_workers=True,
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
        if args.no_persistent_workers or cfg[field].get('num_workers') == 0:
            # DataLoader rejects persistent workers without workers.
            cfg[field]['persistent_workers'] = False

    set_default_dataloader_cfg(cfg, 'train_dataloader')
    set_default_dataloader_cfg(cfg, 'val_dataloader')
    set_default_dataloader_cfg(cfg, 'test_dataloader')

    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    return cfg


def main(argv=None):
    args = parse_args(argv)
    import_atomnas_mm()
    from mmengine.config import Config
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    cfg = Config.fromfile(args.config)
    cfg = merge_args(cfg, args)
    cfg.launcher = args.launcher  # what cpu_ddp_workaround reads
    from atomnas_mm.datasets import check_data
    from atomnas_mm.utils import cpu_ddp_workaround
    check_data(cfg, ('train', 'val') if cfg.get('val_cfg') else ('train', ))
    cpu_ddp_workaround(cfg)
    from atomnas_mm.utils import busy_machine_threads
    threads = busy_machine_threads()
    if threads is not None:
        import torch
        torch.set_num_threads(threads)
        print(f'{osp.basename(sys.argv[0])}: the cores are busy (load '
              f'{os.getloadavg()[0]:.1f} on {os.cpu_count()}): 1 torch '
              'thread; set OMP_NUM_THREADS to choose')

    lock = None
    if global_rank() == 0:
        from atomnas_mm.engine.runner_lock import WorkDirLock
        lock = WorkDirLock(osp.abspath(cfg.work_dir))
        lock.acquire()  # WorkDirBusyError: another live run holds it
        if lock.stale_message():
            print(f'{osp.basename(sys.argv[0])}: warning: '
                  f'{lock.stale_message()}', file=sys.stderr)
    try:
        if 'runner_type' not in cfg:
            runner = Runner.from_cfg(cfg)
        else:
            runner = RUNNERS.build(cfg)
        runner.logger.addFilter(KnownHarmless())

        runner.train()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(disk_full_message(e, cfg.work_dir)) from e
        raise
    finally:
        if lock is not None:
            lock.release()


class KnownHarmless(logging.Filter):
    """Drops mmengine 0.10.7's deprecation WARNINGs about its own classes:
    its CheckpointHook builds a ``FileClient`` (whose local backend is the
    alias ``HardDiskBackend``) at every start; nothing for a user to do."""

    MESSAGES = ('"FileClient" will be deprecated in future',
                '"HardDiskBackend" is the alias of "LocalBackend"')

    def filter(self, record):
        return not str(record.msg).startswith(self.MESSAGES)


class DiskFullError(RuntimeError):
    """A write failed for lack of space (the message says what to do)."""


def global_rank():
    """This process's rank from the launcher's environment (0 alone)."""
    for name in ('RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK'):
        if os.environ.get(name, '').isdigit():
            return int(os.environ[name])
    return 0


def file_being_written(error):
    """The file a failed write was for: the error's ``filename``, else the
    innermost file object open for writing in the failing frames (a
    ``write`` or ``close`` error carries no name). None if not found."""
    if error.filename:
        return os.fsdecode(error.filename)
    import io
    tb, frames = error.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            name = getattr(value, 'name', None)
            mode = getattr(value, 'mode', '')
            if isinstance(value, io.IOBase) and isinstance(name, str) and \
                    isinstance(mode, str) and set(mode) & set('wax+'):
                return name
    return None


def disk_full_message(error, work_dir):
    """What failed, what is intact, how to go on."""
    last = None
    try:
        with open(osp.join(work_dir, 'last_checkpoint')) as f:
            last = f.read().strip() or None
    except OSError:
        pass
    name = file_being_written(error)
    what = (f'{name} could not be written' if name else
            'a file could not be written')
    intact = (f'the last complete checkpoint, {last}, is intact (checkpoints '
              'are written to a temporary name and renamed when complete)'
              if last else 'no checkpoint had been written yet')
    again = ('run the same command with --resume to continue from it' if last
             else 'run the same command again')
    return (f'disk full: {what} ({error.strerror or error}); {intact}. Free '
            f'space on the disk of {osp.abspath(work_dir)}, then {again}.')


if __name__ == '__main__':
    try:
        import_atomnas_mm()
        from atomnas_mm.datasets import DatasetNotFoundError
        from atomnas_mm.engine.runner_lock import WorkDirBusyError
        from atomnas_mm.engine.search_settings import SearchSettingsChanged
    except ImportError:  # the traceback says what is missing
        DatasetNotFoundError = WorkDirBusyError = SearchSettingsChanged = ()
    try:
        main()
    except (DatasetNotFoundError, WorkDirBusyError, DiskFullError,
            SearchSettingsChanged) as e:
        sys.exit(f'{osp.basename(sys.argv[0])}: error: {e}')
