"""Small runtime helpers."""
import os

import torch


def cpu_ddp_workaround(cfg):
    """Let mmengine 0.10.7 run DDP on CPU (gloo); a no-op when CUDA exists.

    mmengine calls ``torch.cuda.set_device`` unconditionally and wraps with
    ``device_ids=[local_rank]``, which DDP rejects for CPU modules
    (docs/method.md, "Known mmengine issues"). Without CUDA and with a launcher other than ``'none'``
    (``cfg['launcher']``): make ``set_device`` a no-op, switch an ``nccl``
    (or unset) backend to ``gloo`` and wrap with ``device_ids=None`` unless
    the config chose a wrapper.

    Args:
        cfg (Config | dict): Runner config, changed in place.

    Returns:
        bool: Whether the workaround was applied.
    """
    if torch.cuda.is_available() or cfg.get('launcher', 'none') == 'none':
        return False
    torch.cuda.set_device = lambda *args, **kwargs: None
    # Assign, then read back: Config/ConfigDict store a converted copy, so
    # the object that ``setdefault`` returns may not be the stored one.
    if cfg.get('env_cfg') is None:
        cfg['env_cfg'] = {}
    if cfg['env_cfg'].get('dist_cfg') is None:
        cfg['env_cfg']['dist_cfg'] = {}
    dist_cfg = cfg['env_cfg']['dist_cfg']
    if dist_cfg.get('backend', 'nccl') == 'nccl':
        dist_cfg['backend'] = 'gloo'
    if cfg.get('model_wrapper_cfg') is None:
        cfg['model_wrapper_cfg'] = dict(type='MMDistributedDataParallel',
                                        device_ids=None,
                                        broadcast_buffers=False)
    return True


def busy_machine_threads(environ=None, cores=None, load=None):
    """One torch thread where the machine is already busy, else None.

    torch starts one OpenMP thread per core; on a machine whose cores are
    taken by other processes those threads wait on each other (the demo
    ran 8x slower on 2 shared cores than with one thread). A run whose
    ``OMP_NUM_THREADS`` is unset and whose 1-minute load average fills the
    cores gets one thread; an explicit ``OMP_NUM_THREADS`` always wins.

    Args:
        environ (Mapping, optional): The environment (default: os.environ).
        cores (int, optional): CPU cores (default: os.cpu_count()).
        load (float, optional): 1-minute load average (default: the OS's).

    Returns:
        int | None: 1, or None to keep torch's default.
    """
    environ = os.environ if environ is None else environ
    if environ.get('OMP_NUM_THREADS'):
        return None
    cores = os.cpu_count() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available on this OS
            return None
    return 1 if cores and cores > 1 and load >= cores else None
