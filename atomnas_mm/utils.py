"""Small runtime helpers."""
import torch


def cpu_ddp_workaround(cfg):
    """Let mmengine 0.10.7 run DDP on CPU (gloo); a no-op when CUDA exists.

    mmengine calls ``torch.cuda.set_device`` unconditionally and wraps with
    ``device_ids=[local_rank]``, which DDP rejects for CPU modules
    (ENVIRONMENT.md). Without CUDA: make ``set_device`` a no-op, use gloo and
    wrap with ``device_ids=None`` unless the config chose a wrapper.

    Args:
        cfg (Config | dict): Runner config, changed in place.

    Returns:
        bool: Whether the workaround was applied.
    """
    if torch.cuda.is_available() or cfg.get('launcher', 'none') == 'none':
        return False
    torch.cuda.set_device = lambda device: None
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    if cfg.get('model_wrapper_cfg') is None:
        cfg['model_wrapper_cfg'] = dict(type='MMDistributedDataParallel',
                                        device_ids=None,
                                        broadcast_buffers=False)
    return True
