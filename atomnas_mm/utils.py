"""Small runtime helpers."""
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
