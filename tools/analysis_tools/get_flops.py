"""Print a model's FLOPs and params in two conventions, side by side.

* AtomNAS: multiply-adds of Conv2d and Linear plus global pooling, params
  of Conv2d and Linear only (BN excluded), batch 1; the convention of the
  AtomNAS paper (``atomnas_mm.models.count_flops_params``).
* mmengine: ``mmengine.analysis.get_model_complexity_info`` (fvcore-style
  FLOPs, where one multiply-add is one FLOP, plus one op per element for
  BatchNorm; all parameters, BN included).

The README and the model zoo quote the AtomNAS convention (its row says
so); the tracer's known WARNINGs are dropped. Both count the whole
classifier (backbone, neck and head), unlike
mmpretrain's get_flops.py, which counts ``extract_feat`` only. The input has
the model's own channels (1 for the grey demo, 3 for RGB); ``--shape``
defaults to the config's input size (:func:`atomnas_mm.export.input_size`:
its ``input_size``, the AtomShrinkHook's, the test CenterCrop's, else 224).

Example::

    python tools/analysis_tools/get_flops.py \
        configs/_base_/models/atomnas-a.py --shape 224
    python tools/analysis_tools/get_flops.py \
        configs/demo/atomnas_fashion_mnist.py        # 1 x 28 x 28
"""
import argparse
import logging
import os.path as osp
import sys
import warnings

# mmengine imports pkg_resources, which setuptools >= 67 deprecates.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)


def _import_atomnas_mm():
    """Import atomnas_mm, adding the repository root to sys.path if needed."""
    try:
        import atomnas_mm  # noqa: F401
    except ImportError:
        root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
        sys.path.insert(0, root)
        import atomnas_mm  # noqa: F401


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(
        description='Get model FLOPs and params (AtomNAS and mmengine '
        'conventions)')
    parser.add_argument('config', help='config file path')
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        help='input image size: H (square) or H W (default: the config\'s '
        'input size)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file.')
    return parser.parse_args(argv)


class KnownHarmless(logging.Filter):
    """Drops the WARNINGs of mmengine's complexity tracer that every
    classifier gives: the operators it reports as not counted (residual
    adds and the like) and the submodules the tensor-mode forward does not
    call (the data preprocessor and the loss)."""

    MESSAGES = ('Unsupported operator aten::',
                'The following submodules of the model were never called')

    def filter(self, record):
        return not record.getMessage().startswith(self.MESSAGES)


def _fmt(value, unit):
    return f'{value / unit:.2f}'


def main(argv=None):
    args = parse_args(argv)
    _import_atomnas_mm()
    import torch
    from mmengine.analysis import get_model_complexity_info
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmpretrain import get_model

    from atomnas_mm.export import input_channels, input_size
    from atomnas_mm.models import count_flops_params

    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.shape is None:
        size = input_size(cfg)
    elif len(args.shape) == 1:
        size = (args.shape[0], args.shape[0])
    elif len(args.shape) == 2:
        size = tuple(args.shape)
    else:
        raise ValueError(f'--shape: expected 1 or 2 ints, got {args.shape}')
    model = get_model(cfg)
    model.eval()
    input_shape = (input_channels(model), ) + tuple(size)

    ours_flops, ours_params = count_flops_params(model, (1, ) + input_shape)
    # ImageClassifier.forward defaults to mode='tensor' (logits).
    quiet = KnownHarmless()
    logger = MMLogger.get_current_instance()
    logger.addFilter(quiet)
    try:
        with torch.no_grad():
            info = get_model_complexity_info(
                model, input_shape, show_table=False, show_arch=False)
    finally:
        logger.removeFilter(quiet)
    mm_flops, mm_params = info['flops'], info['params']

    rows = [('AtomNAS (MAdds, conv+FC params; quoted in README)',
             ours_flops, ours_params),
            ('mmengine get_model_complexity_info', mm_flops, mm_params)]
    width = max(len(r[0]) for r in rows)
    line = '=' * (width + 26)
    print(line)
    print(f'Config: {args.config}')
    print(f'Input shape: {(1, ) + input_shape}')
    print(f'{"convention":<{width}}  {"FLOPs (M)":>10}  {"Params (M)":>10}')
    for name, flops, params in rows:
        print(f'{name:<{width}}  {_fmt(flops, 1e6):>10}  '
              f'{_fmt(params, 1e6):>10}')
    print(line)
    return dict(atomnas=(ours_flops, ours_params), mmengine=(mm_flops,
                                                             mm_params))


if __name__ == '__main__':
    main()
