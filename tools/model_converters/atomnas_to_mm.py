"""Convert a released AtomNAS reference checkpoint to an mmpretrain one.

Reads both layouts of the reference checkpoints (docs/method.md,
"Reference checkpoints"; A/B/C: per-branch ``ops``;
"+": fused ``expand_conv``/``depth_ops``/``se_op``/``project_conv``), with or
without the ``'module.'`` prefix; the EMA shadow (``ckpt['ema']['shadow']``)
wins over ``ckpt['model']`` where present. The architecture is read from the
tensor shapes only (never from side-car files). The result is::

    {'state_dict': {'backbone.*', 'head.fc.*'},
     'meta': {'atomnas_arch': {'backbone': arch dict}}}

for ``ImageClassifier(backbone=AtomNAS(arch=...), GlobalAveragePooling,
LinearClsHead)``.

The source is loaded with ``torch.load(weights_only=True)``; released files
that pickle other objects (e.g. meters) are refused unless
``--trust-unsafe-pickle`` is given.

Example::

    python tools/model_converters/atomnas_to_mm.py atomnas_a.pth \
        atomnas-a_in1k.pth
"""
import argparse
import os.path as osp
import pickle
import re
import sys
from collections import OrderedDict

import torch

BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var',
           'num_batches_tracked')


def import_atomnas_mm():
    """Import atomnas_mm, from the repository if it is not installed."""
    try:
        import atomnas_mm  # noqa: F401
    except ImportError:
        sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(
            osp.abspath(__file__)))))
        import atomnas_mm  # noqa: F401


def _layout():
    """Block count and stride-2 positions (``features.i``) of the supernet."""
    from atomnas_mm.models.archs import supernet_rows
    rows = supernet_rows()
    return len(rows), tuple(i + 1 for i, r in enumerate(rows) if r[2] == 2)


def load_source(path, trust_unsafe_pickle=False):
    """Load ``path`` with weights_only unless the user trusts it.

    Raises:
        pickle.UnpicklingError: When the file needs unsafe unpickling and
            ``trust_unsafe_pickle`` is False.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'SRC: {path} does not exist')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_unsafe_pickle:
            raise pickle.UnpicklingError(
                f'SRC: {path} holds objects that torch.load(weights_only='
                'True) refuses (unpickling them can run arbitrary code). '
                'Re-run with --trust-unsafe-pickle only if you trust where '
                f'the file comes from. Details: {e}') from None
    return torch.load(path, map_location='cpu', weights_only=False)


def _strip(state):
    return {(k[7:] if k.startswith('module.') else k): v
            for k, v in state.items() if torch.is_tensor(v)}


def source_state(ckpt):
    """Flat reference state: ``model`` overlaid with the EMA shadow."""
    if not isinstance(ckpt, dict):
        raise ValueError(f'SRC: expected a dict, got {type(ckpt).__name__}')
    state = _strip(ckpt['model'] if 'model' in ckpt else ckpt)
    ema = ckpt.get('ema')
    if isinstance(ema, dict) and isinstance(ema.get('shadow'), dict):
        state.update(_strip(ema['shadow']))
    if not any(k.startswith('features.') for k in state):
        raise ValueError('SRC: no "features.*" weights; not an AtomNAS '
                         'reference checkpoint')
    return state


def _bn(state, prefix):
    missing = [k for k in BN_KEYS[:4] if prefix + k not in state]
    if missing:
        raise KeyError(f'SRC: BatchNorm {prefix}* lacks {missing}')
    return {k: state[prefix + k] for k in BN_KEYS if prefix + k in state}


def _cat_bn(bns):
    out = {k: torch.cat([bn[k] for bn in bns]) for k in BN_KEYS[:4]}
    if 'num_batches_tracked' in bns[0]:
        out['num_batches_tracked'] = bns[0]['num_batches_tracked']
    return out


def _branches(state, block):
    """A/B/C layout: per-branch tensors of ``features.{block}``."""
    pre = f'features.{block}.ops.'
    ids = sorted({int(k[len(pre):].split('.')[0]) for k in state
                  if k.startswith(pre)})
    out = []
    for j in ids:
        p = f'{pre}{j}.'
        if p + '2.weight' in state:     # expand, depthwise, projection
            expand = dict(weight=state[p + '0.0.weight'],
                          bn=_bn(state, p + '0.1.'))
            dw, proj = p + '1.', state[p + '2.weight']
        else:                           # depthwise, projection
            expand, dw, proj = None, p + '0.', state[p + '1.weight']
        out.append(dict(expand=expand, dw=state[dw + '0.weight'],
                        dw_bn=_bn(state, dw + '1.'), project=proj))
    return out


def _block_abc(state, i):
    """Fused tensors of block ``i`` from the A/B/C layout."""
    branches = _branches(state, i)
    block = dict(dw=[(b['dw'], b['dw_bn']) for b in branches],
                 project_bn=_bn(state, f'features.{i}.pw_bn.'))
    if branches:
        block['project'] = torch.cat([b['project'] for b in branches], 1)
        if branches[0]['expand'] is not None:
            block['expand'] = torch.cat(
                [b['expand']['weight'] for b in branches])
            block['expand_bn'] = _cat_bn([b['expand']['bn']
                                          for b in branches])
    return block


def _block_plus(state, i):
    """Fused tensors of block ``i`` from the "+" layout."""
    pre = f'features.{i}.'
    dws = {}
    pattern = re.compile(re.escape(pre) + r'depth_ops\.(\d+)\.(.*)0\.weight$')
    for k, v in state.items():
        m = pattern.match(k)
        if m and v.dim() == 4 and v.shape[1] == 1:
            dws[int(m.group(1))] = (v, _bn(state, k[:-len('0.weight')] + '1.'))
    block = dict(dw=[dws[j] for j in sorted(dws)])
    if dws:
        block['project'] = state[pre + 'project_conv.0.weight']
        block['project_bn'] = _bn(state, pre + 'project_conv.1.')
        if pre + 'expand_conv.0.weight' in state:
            block['expand'] = state[pre + 'expand_conv.0.weight']
            block['expand_bn'] = _bn(state, pre + 'expand_conv.1.')
        if pre + 'se_op.se_reduce.weight' in state:
            block['se'] = [state[pre + f'se_op.{n}.{p}']
                           for n in ('se_reduce', 'se_expand')
                           for p in ('weight', 'bias')]
    elif pre + 'project_conv.1.weight' in state:
        block['project_bn'] = _bn(state, pre + 'project_conv.1.')
    return block


def read_blocks(state):
    """Per-block fused tensors, the layout name and the block count."""
    plus = any('.depth_ops.' in k or '.expand_conv.' in k for k in state)
    num_blocks, _ = _layout()
    ids = sorted({int(k.split('.')[1]) for k in state
                  if k.startswith('features.')})
    if ids != list(range(num_blocks + 2)):
        raise ValueError(f'SRC: expected features.0..{num_blocks + 1} (stem, '
                         f'{num_blocks} blocks, head conv), found {ids}')
    reader = _block_plus if plus else _block_abc
    return [reader(state, i) for i in range(1, num_blocks + 1)], plus


def infer_arch(state, blocks, plus):
    """The arch dict that the tensor shapes describe."""
    from atomnas_mm.models.archs import PLUS_DEFAULTS
    num_blocks, stride2 = _layout()
    rows, in_ch = [], state['features.0.0.weight'].shape[0]
    for i, block in enumerate(blocks, 1):
        out = block['project_bn']['weight'].shape[0]
        kernels = [int(w.shape[-1]) for w, _ in block['dw']]
        hidden = [int(w.shape[0]) for w, _ in block['dw']]
        has_expand = 'expand' in block or (not hidden and i > 1)
        rows.append([int(out), 1, 2 if i in stride2 else 1, kernels,
                     hidden, has_expand])
        if 'se' in block and block['se'][0].shape[0] != round(0.5 * in_ch):
            raise ValueError(
                f'SRC: block {i} SE has {block["se"][0].shape[0]} squeeze '
                f'channels, AtomNAS "+" uses round(0.5 * {in_ch})')
        in_ch = out
    arch = dict(rows=rows,
                stem_channels=int(state['features.0.0.weight'].shape[0]),
                last_channels=int(state[f'features.{num_blocks + 1}.0.weight']
                                  .shape[0]))
    if plus:
        arch.update(PLUS_DEFAULTS)
    return arch


def _put_bn(out, prefix, bn):
    for k, v in bn.items():
        out[f'{prefix}.{k}'] = v


def block_state(block, dw, project_bn, expand=None, project=None, se=None):
    """An AtomicBlock's state dict (relative keys) from fused tensors.

    Args:
        block (AtomicBlock): The block of the mm backbone.
        dw (list[tuple[Tensor, dict]]): Per kernel group, in order, the
            depthwise weight ``(h, 1, k, k)`` and its BN tensors.
        project_bn (dict): Projection BN tensors (``weight``, ``bias``,
            ``running_mean``, ``running_var``).
        expand (tuple[Tensor, dict], optional): Expand weight and BN.
        project (Tensor, optional): Projection weight (None when the block
            has no atoms left: its BN's response to 0 becomes ``bias``).
        se (list[Tensor], optional): Squeeze weight, bias, excite weight,
            bias.

    Returns:
        dict[str, Tensor]
    """
    from atomnas_mm.models.blocks import dw_key
    out = {}

    def put(prefix, cm, weight, bn):
        out[f'{prefix}.conv.weight'] = weight
        for key, value in bn.items():
            out[f'{prefix}.{cm.norm_name}.{key}'] = value

    if project is None:
        eps = 1e-3 if block.project is None else block.project.norm.eps
        scale = project_bn['weight'] / torch.sqrt(
            project_bn['running_var'] + eps)
        out['bias'] = project_bn['bias'] - project_bn['running_mean'] * scale
        return out
    if expand is not None:
        put('expand', block.expand, *expand)
    for weight, bn in dw:
        key = dw_key(weight.shape[-1])
        put(f'dw.{key}', block.dw[key], weight, bn)
    if se is not None:
        for key, value in zip(('conv1.conv.weight', 'conv1.conv.bias',
                               'conv2.conv.weight', 'conv2.conv.bias'), se):
            out[f'se.{key}'] = value
    put('project', block.project, project, project_bn)
    return out


def _put_block(out, name, module, block):
    """Write one block's fused tensors under ``backbone.{name}``."""
    parts = block_state(
        module, dw=block['dw'], project_bn=block['project_bn'],
        expand=(block['expand'], block['expand_bn']) if 'expand' in block
        else None,
        project=block.get('project') if block['dw'] else None,
        se=block.get('se'))
    for key, value in parts.items():
        out[f'backbone.{name}.{key}'] = value


def convert(ckpt):
    """Convert a loaded reference checkpoint; return the mm checkpoint."""
    from atomnas_mm.models.backbones.atomnas import AtomNAS
    state = source_state(ckpt)
    blocks, plus = read_blocks(state)
    arch = infer_arch(state, blocks, plus)
    backbone = AtomNAS(arch=arch)
    out = OrderedDict()
    out['backbone.conv1.conv.weight'] = state['features.0.0.weight']
    _put_bn(out, 'backbone.conv1.bn', _bn(state, 'features.0.1.'))
    names = {id(m): n for n, m in backbone.named_modules()}
    for module, block in zip(backbone.blocks(), blocks):
        _put_block(out, names[id(module)], module, block)
    head = f'features.{_layout()[0] + 1}.'
    out['backbone.conv2.conv.weight'] = state[head + '0.weight']
    _put_bn(out, 'backbone.conv2.bn', _bn(state, head + '1.'))
    out['head.fc.weight'] = state['classifier.1.weight']
    out['head.fc.bias'] = state['classifier.1.bias']

    # Buffers the reference does not have come from a fresh model.
    fresh = backbone.state_dict()
    for k, v in fresh.items():
        key = f'backbone.{k}'
        if key not in out:
            if not k.endswith(('penalty_weight', 'num_batches_tracked')):
                raise KeyError(f'SRC: no weights found for {key}')
            out[key] = v
        elif out[key].shape != v.shape:
            raise ValueError(f'SRC: {key} has shape {tuple(out[key].shape)}'
                             f', the inferred arch needs {tuple(v.shape)}')
    extra = sorted(set(out) - {f'backbone.{k}' for k in fresh}
                   - {'head.fc.weight', 'head.fc.bias'})
    if extra:
        raise ValueError(f'SRC: converted keys the model lacks: {extra[:5]}')
    state_dict = OrderedDict(
        (k, v.detach().clone().contiguous()) for k, v in out.items())
    return dict(state_dict=state_dict,
                meta=dict(atomnas_arch=dict(backbone=arch),
                          num_classes=int(out['head.fc.weight'].shape[0])))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert an AtomNAS reference checkpoint to mmpretrain')
    parser.add_argument('src', help='reference checkpoint (.pth)')
    parser.add_argument('dst', help='output mmpretrain checkpoint (.pth)')
    parser.add_argument('--trust-unsafe-pickle', action='store_true',
                        help='allow torch.load(weights_only=False) for SRC '
                        '(runs code from the file: only for trusted files)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import_atomnas_mm()
    result = convert(load_source(args.src, args.trust_unsafe_pickle))
    dst_dir = osp.dirname(osp.abspath(args.dst))
    if not osp.isdir(dst_dir):
        raise FileNotFoundError(f'DST: directory {dst_dir} does not exist')
    torch.save(result, args.dst)
    rows = result['meta']['atomnas_arch']['backbone']['rows']
    print(f'{args.dst}: {len(result["state_dict"])} tensors, {len(rows)} '
          f'blocks, {result["meta"]["num_classes"]} classes')
    return result


if __name__ == '__main__':
    main()
