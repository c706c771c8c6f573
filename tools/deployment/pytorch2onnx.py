"""Export an (AtomNAS) mmpretrain classifier to ONNX with a dynamic batch.

The graph takes the normalised image batch (what the config's
``data_preprocessor`` produces), ``[N, C, H, W]`` with ``C`` the model's
input channels (1 for the grey demo, 3 for RGB), and returns the class
logits ``[N, num_classes]`` (``--softmax``: probabilities). ``--shape``
defaults to the config's input size (:func:`atomnas_mm.export.input_size`:
its ``input_size``, the AtomShrinkHook's, the test CenterCrop's, else 224).
When the checkpoint stores a searched architecture (``meta['atomnas_arch']``)
the model is built with it, so a search checkpoint exports with its search
config. The work is done by :mod:`atomnas_mm.export`.

The graph is the exact ONNX Runtime form (:mod:`atomnas_mm.models.deploy_onnx`,
docs/benchmarks.md "Deployment"): BN folded, every AtomNAS block's kernel
groups widened with zero channels to a multiple of ``--align`` (16:
ONNX Runtime's channel block on AVX-512 CPUs, aligned for AVX2's 8 too), the
kernel groups of a block merged into one depthwise conv (``--deploy-form
merged``, the fastest measured; ``auto`` and ``split`` keep parts); same
outputs.
``--deploy-form modules`` exports the modules as built (slower there).

Uses torch's TorchScript-based exporter (``dynamo=False``), which needs only
the ``onnx`` package; ``--verify`` compares with onnxruntime.

Example::

    python tools/deployment/pytorch2onnx.py export/demo/atomnas_fashion_mnist.py \
        export/demo/atomnas_fashion_mnist.pth --out demo.onnx --verify
"""
import argparse
import os.path as osp
import sys


def import_atomnas_mm():
    """Import atomnas_mm, from the repository if it is not installed."""
    try:
        import atomnas_mm  # noqa: F401
    except ImportError:
        sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(
            osp.abspath(__file__)))))
        import atomnas_mm  # noqa: F401


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
    parser.add_argument('--shape', type=int, nargs='+',
                        help='input size: H (square) or H W (default: the '
                        "config's input size)")
    parser.add_argument('--opset', type=int, default=17, help='ONNX opset')
    parser.add_argument('--softmax', action='store_true',
                        help='output probabilities instead of logits')
    parser.add_argument('--deploy-form', default='merged',
                        choices=['auto', 'split', 'merged', 'modules'],
                        help='AtomNAS blocks: one merged depthwise conv '
                        '(merged, default), parts chosen per block (auto), '
                        'one part per kernel group (split), or the modules '
                        'as built')
    parser.add_argument('--align', type=int,
                        help='round every part up to a multiple of this many '
                        'channels with zero channels (default 16; 1: none)')
    parser.add_argument('--verify', action='store_true',
                        help='compare with onnxruntime (batch 1 and 3)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import_atomnas_mm()
    from mmengine.config import Config

    from atomnas_mm.export import (build_from_checkpoint, export_onnx,
                                   input_channels, input_size, verify_onnx)
    cfg = Config.fromfile(args.config)
    shape = parse_shape(args.shape) if args.shape else input_size(cfg)
    model = build_from_checkpoint(cfg, args.checkpoint)
    if args.align is not None and args.align < 1:
        raise SystemExit(f'--align must be >= 1, got {args.align}')
    module = export_onnx(model, args.out, shape, args.opset, args.softmax,
                         merge=args.deploy_form, align=args.align)
    print(f'{args.out}: input [batch, {input_channels(model)}, {shape[0]}, '
          f'{shape[1]}]')
    if args.verify:
        errors = verify_onnx(module, args.out, shape)
        print('max |onnxruntime - pytorch|: ' + ', '.join(
            f'batch {n}: {e:.2e}' for n, e in errors.items()))
        return errors
    return None


if __name__ == '__main__':
    main()
