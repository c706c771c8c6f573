"""Export an (AtomNAS) mmpretrain classifier to ONNX with a dynamic batch.

The graph takes the normalised image batch (what the config's
``data_preprocessor`` produces: RGB, mean/std applied), shape
``[N, 3, H, W]``, and returns the class logits ``[N, num_classes]``
(``--softmax``: probabilities). When the checkpoint stores a searched
architecture (``meta['atomnas_arch']``, written by AtomShrinkHook,
tools/export_searched.py and the converter), the model is built with it, so a
search checkpoint exports with its search config.

Uses torch's TorchScript-based exporter (``dynamo=False``), which needs only
the ``onnx`` package; ``--verify`` compares with onnxruntime when installed.

Example::

    python tools/deployment/pytorch2onnx.py work_dirs/export/search_a.py \
        work_dirs/export/search_a.pth --out search_a.onnx --shape 224 --verify
"""
import argparse
import os.path as osp
import sys

import torch

ARCH_ARGS = ('stem_channels', 'last_channels', 'act_cfg', 'se_ratio')


def import_atomnas_mm():
    """Import atomnas_mm, from the repository if it is not installed."""
    try:
        import atomnas_mm  # noqa: F401
    except ImportError:
        sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(
            osp.abspath(__file__)))))
        import atomnas_mm  # noqa: F401


def build_classifier(config, checkpoint):
    """Build the model of ``config`` in eval mode with ``checkpoint``.

    The backbone arch is taken from ``meta['atomnas_arch']`` when present.
    """
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import CheckpointLoader
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(config) if isinstance(config, str) else config
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'CHECKPOINT: {checkpoint} does not exist')
    ckpt = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    state = ckpt.get('state_dict', ckpt)
    model_cfg = cfg.model
    for path, arch in (ckpt.get('meta', {}).get('atomnas_arch') or {}).items():
        node = model_cfg
        for part in path.split('.'):
            node = node[part]
        for key in ARCH_ARGS:
            node.pop(key, None)
        node['arch'] = arch
        node['init_cfg'] = None
    model_cfg.pop('init_cfg', None)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    model = MODELS.build(model_cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


class OnnxClassifier(torch.nn.Module):
    """The exported graph: normalised images to logits (or probabilities).

    Args:
        model (ImageClassifier): The classifier, in eval mode.
        softmax (bool): Output probabilities instead of logits.
    """

    def __init__(self, model, softmax=False):
        super().__init__()
        self.model, self.softmax = model, softmax

    def forward(self, x):
        out = self.model(x, mode='tensor')
        return out.softmax(-1) if self.softmax else out


def export(model, out, shape=(224, 224), opset=17, softmax=False):
    """Write ``model`` to ``out`` with a dynamic batch dimension."""
    module = OnnxClassifier(model, softmax).eval()
    dummy = torch.randn(1, 3, *shape)
    with torch.no_grad():
        torch.onnx.export(
            module, (dummy, ), out, dynamo=False, opset_version=opset,
            input_names=['input'], output_names=['output'],
            dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}})
    return module


def verify(module, out, shape, batches=(1, 3)):
    """Max |onnxruntime - PyTorch| over random batches of each size."""
    import numpy as np
    import onnxruntime
    session = onnxruntime.InferenceSession(
        out, providers=['CPUExecutionProvider'])
    errors = {}
    for n in batches:
        x = torch.randn(n, 3, *shape)
        with torch.no_grad():
            expected = module(x).numpy()
        got = session.run(None, {'input': x.numpy()})[0]
        errors[n] = float(np.abs(got - expected).max())
    return errors


def parse_shape(values):
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) == 2:
        return tuple(values)
    raise ValueError(f'--shape: give H or H W, got {values}')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export an mmpretrain classifier to ONNX')
    parser.add_argument('config', help='model config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', required=True, help='output .onnx file')
    parser.add_argument('--shape', type=int, nargs='+', default=[224],
                        help='input size: H (square) or H W')
    parser.add_argument('--opset', type=int, default=17, help='ONNX opset')
    parser.add_argument('--softmax', action='store_true',
                        help='output probabilities instead of logits')
    parser.add_argument('--verify', action='store_true',
                        help='compare with onnxruntime (batch 1 and 3)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    shape = parse_shape(args.shape)
    import_atomnas_mm()
    model = build_classifier(args.config, args.checkpoint)
    module = export(model, args.out, shape, args.opset, args.softmax)
    print(f'{args.out}: input [batch, 3, {shape[0]}, {shape[1]}]')
    if args.verify:
        errors = verify(module, args.out, shape)
        print('max |onnxruntime - pytorch|: ' + ', '.join(
            f'batch {n}: {e:.2e}' for n, e in errors.items()))
        return errors
    return None


if __name__ == '__main__':
    main()
