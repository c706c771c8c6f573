"""A searched stock model as a config: build it, then narrow its units."""
from ..registry import MODELS


@MODELS.register_module(name='Narrowed')
def build_narrowed(model, channel_units, **kwargs):
    """Build ``model`` (any config, e.g. mmpretrain's ``MobileNetV2`` or
    mmdet's ``ResNet``) and narrow its channel units to the searched widths
    (their first channels: weights are loaded afterwards). The result is the
    stock module itself, so checkpoints keep their keys.

    ``tools/export_searched.py`` writes it for a search on a stock model::

        backbone=dict(type='atomnas_mm.Narrowed',
                      model=dict(type='MobileNetV2', widen_factor=1.0),
                      channel_units={'layer2.0.conv.1.bn': [37], ...})

    Args:
        model (dict): The config of the module to build (in the current
            default scope).
        channel_units (dict): ``{unit name: [width]}``, names relative to
            ``model`` (``meta['channel_units']`` of a search checkpoint).
        **kwargs: Set on ``model`` where it has none (the Runner gives a
            whole model its ``data_preprocessor``: a model whose units reach
            outside its backbone, e.g. MobileNetV2's last conv read by the
            head, is narrowed whole).

    Returns:
        nn.Module: The narrowed module.
    """
    from ..search.shrink import narrow_to_widths
    model = dict(model)
    for key, value in kwargs.items():
        model.setdefault(key, value)
    module = MODELS.build(model)
    narrow_to_widths(module, channel_units)
    return module
