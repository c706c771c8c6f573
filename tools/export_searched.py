"""Export the network an AtomNAS search ended with.

From a search work_dir (its latest checkpoint, named in ``last_checkpoint``)
or a checkpoint file, write to ``--out``:

* ``arch.json``: the backbone arch dict (rows, stem_channels, last_channels,
  act_cfg, se_ratio), usable as ``model.backbone.arch``;
* ``<name>.py``: a standalone retrain/eval config with that arch and without
  the search hooks: the search run's own config (stored in the checkpoint,
  or ``--config``) or, with ``--inherit``, a small file inheriting another
  config (e.g. ``configs/retrain/atomnas-a_in1k.py``) by absolute path;
* ``<name>.pth``: ``{'state_dict', 'meta': {'atomnas_arch', ...}}`` with the
  EMA weights, loadable with ``torch.load(weights_only=True)``.

About the EMA weights: mmengine's EMAHook swaps the averaged weights into
``checkpoint['state_dict']`` before saving and leaves the *live* weights,
``'module.'``-prefixed, in ``checkpoint['ema_state_dict']``
(``EMAHook._swap_ema_state_dict``). So ``state_dict`` is exported; it holds
the EMA weights whenever EMAHook ran, and the plain weights otherwise.

Example::

    python tools/export_searched.py work_dirs/search_a --out work_dirs/export
    python tools/test.py work_dirs/export/search_a.py \
        work_dirs/export/search_a.pth
"""
import argparse
import json
import os
import os.path as osp
import sys

# Hooks that only make sense while searching (matched on the type's name).
SEARCH_HOOKS = ('AtomShrinkHook', 'BNL1PenaltyHook')
# Backbone arguments the arch dict carries itself.
ARCH_ARGS = ('stem_channels', 'last_channels', 'act_cfg', 'se_ratio')


def import_atomnas_mm():
    """Import atomnas_mm (registries, weights_only allowlist)."""
    try:
        import atomnas_mm  # noqa: F401
    except ImportError:
        sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
        import atomnas_mm  # noqa: F401


def find_checkpoint(path):
    """The checkpoint of ``path``: the file itself or a work_dir's latest.

    Raises:
        FileNotFoundError: Naming ``path`` when nothing is found.
    """
    if osp.isfile(path):
        return path
    if not osp.isdir(path):
        raise FileNotFoundError(f'WORK_DIR_OR_CHECKPOINT: {path} does not '
                                'exist')
    marker = osp.join(path, 'last_checkpoint')
    if not osp.isfile(marker):
        raise FileNotFoundError(f'WORK_DIR_OR_CHECKPOINT: {path} has no '
                                '`last_checkpoint` file; pass a checkpoint')
    with open(marker) as f:
        ckpt = f.read().strip()
    for candidate in (ckpt, osp.join(path, osp.basename(ckpt))):
        if osp.isfile(candidate):
            return candidate
    raise FileNotFoundError(f'{marker} names {ckpt}, which does not exist')


def load_checkpoint(path):
    """Load with mmengine's CheckpointLoader (``weights_only`` stays on)."""
    from mmengine.runner import CheckpointLoader
    ckpt = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise ValueError(f'{path}: not an mmengine checkpoint (no '
                         '"state_dict")')
    return ckpt


def searched_archs(ckpt, path):
    """``meta['atomnas_arch']``: ``{module_path: arch dict}``."""
    archs = ckpt.get('meta', {}).get('atomnas_arch')
    if not archs:
        raise ValueError(f'{path}: no meta["atomnas_arch"]; export needs a '
                         'checkpoint of a run with AtomShrinkHook')
    return archs


def backbone_path(archs, path):
    """The module path of the exported backbone (``'backbone'`` if any)."""
    if 'backbone' in archs:
        return 'backbone'
    if len(archs) == 1:
        return next(iter(archs))
    raise ValueError(f'{path}: several AtomNAS backbones {sorted(archs)}; '
                     'none is called "backbone"')


def strip_search(cfg, archs):
    """Make a search config a retrain/eval config of the searched net.

    Sets the ``arch`` of every AtomNAS in ``archs`` (``{module_path:
    value}``) and drops its arch-derived arguments, drops the search hooks,
    ``load_from``/``resume``/``work_dir``, and adds a test split (the val
    split) when the config has none. ``cfg`` is changed in place.
    """
    for path, arch in archs.items():
        node = cfg.model
        for part in path.split('.'):
            node = node[part]
        for key in ARCH_ARGS:
            node.pop(key, None)
        node['arch'] = arch
    hooks = [h for h in cfg.get('custom_hooks', None) or []
             if not str(h.get('type', '')).endswith(SEARCH_HOOKS)]
    cfg.custom_hooks = hooks
    for key in ('load_from', 'work_dir'):
        cfg.pop(key, None)
    cfg.resume = False
    for split in ('dataloader', 'evaluator', 'cfg'):
        if cfg.get(f'test_{split}') is None and cfg.get(f'val_{split}') \
                is not None:
            cfg[f'test_{split}'] = cfg[f'val_{split}']
    return cfg


def arch_var(module_path):
    """Config variable name of the arch of ``module_path``."""
    return 'arch' if module_path == 'backbone' else \
        'arch_' + module_path.replace('.', '_')


def format_arch(name, arch):
    """``name = dict(...)`` with one row per line (readable, diffable)."""
    lines = [f'{name} = dict(', '    rows=[']
    lines += [f'        {list(row)!r},' for row in arch['rows']]
    lines.append('    ],')
    lines += [f'    {k}={v!r},' for k, v in arch.items() if k != 'rows']
    return '\n'.join(lines + [')', ''])


def export_config(ckpt, archs, path, config=None, inherit=None):
    """Text of the exported config.

    Every arch is a top-level variable (``arch`` for the backbone) that the
    model refers to.

    Args:
        ckpt (dict): The loaded checkpoint (its ``meta['cfg']`` is the
            search config when ``config`` is None).
        archs (dict): ``{module_path: arch dict}``.
        path (str): Checkpoint path, for messages.
        config (str, optional): Search config file to derive from.
        inherit (str, optional): Config to inherit by absolute path instead.
    """
    from mmengine.config import Config
    header = f'# Searched AtomNAS net exported from {osp.abspath(path)}\n'
    arch_text = '\n'.join(format_arch(arch_var(p), a)
                          for p, a in archs.items())
    if inherit is not None:
        if not osp.isfile(inherit):
            raise FileNotFoundError(f'--inherit: {inherit} does not exist')
        lines = [header, f'_base_ = [{osp.abspath(inherit)!r}]\n', arch_text]
        for module_path in archs:
            # The base's arch may be a zoo name: replace, do not merge.
            value = f'dict(_delete_=True, **{arch_var(module_path)})'
            for part in reversed(module_path.split('.') + ['arch']):
                value = f'dict({part}={value})'
            lines.append(f'model = {value}\n')
        return '\n'.join(lines)
    if config is not None:
        cfg = Config.fromfile(config)
    else:
        text = ckpt.get('meta', {}).get('cfg')
        if not text:
            raise ValueError(f'{path}: no config stored in meta["cfg"]; '
                             'pass --config or --inherit')
        cfg = Config.fromstring(text, '.py')
    placeholders = {p: f'__atomnas_arch_{i}__' for i, p in enumerate(archs)}
    text = strip_search(cfg, placeholders).pretty_text
    for module_path, placeholder in placeholders.items():
        quoted = [q for q in (f"'{placeholder}'", f'"{placeholder}"')
                  if q in text]
        if len(quoted) != 1 or text.count(quoted[0]) != 1:
            raise RuntimeError(f'could not place the arch of {module_path} '
                               'in the exported config')
        text = text.replace(quoted[0], arch_var(module_path))
    return '\n'.join([header, arch_text, text])


def export_checkpoint(ckpt, archs):
    """The exported checkpoint dict: weights (EMA if it ran) and arch."""
    meta = dict(atomnas_arch=archs)
    for key in ('dataset_meta', 'epoch', 'iter'):
        if key in ckpt.get('meta', {}):
            meta[key] = ckpt['meta'][key]
    state = {k: v.detach().cpu().clone()
             for k, v in ckpt['state_dict'].items()}
    return dict(state_dict=state, meta=meta)


def export(src, out, name=None, config=None, inherit=None):
    """Export a search run; return the paths written.

    Returns:
        dict: ``arch``, ``config`` and ``checkpoint`` paths.
    """
    import torch
    path = find_checkpoint(src)
    ckpt = load_checkpoint(path)
    archs = searched_archs(ckpt, path)
    arch = archs[backbone_path(archs, path)]
    if name is None:
        base = src if osp.isdir(src) else osp.dirname(osp.abspath(path))
        name = osp.basename(osp.normpath(base)) or 'searched'
    os.makedirs(out, exist_ok=True)
    paths = dict(arch=osp.join(out, 'arch.json'),
                 config=osp.join(out, f'{name}.py'),
                 checkpoint=osp.join(out, f'{name}.pth'))
    with open(paths['arch'], 'w') as f:
        json.dump(arch, f, indent=1)
    with open(paths['config'], 'w') as f:
        f.write(export_config(ckpt, archs, path, config, inherit))
    torch.save(export_checkpoint(ckpt, archs), paths['checkpoint'])
    return paths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export the net of an AtomNAS search run')
    parser.add_argument('src', metavar='WORK_DIR_OR_CHECKPOINT',
                        help='search work_dir (uses `last_checkpoint`) or a '
                        'checkpoint file')
    parser.add_argument('--out', required=True, help='output directory')
    parser.add_argument('--name', help='file name of the config/checkpoint '
                        '(default: the work_dir name)')
    group = parser.add_mutually_exclusive_group()
    group.add_argument('--config', help='search config to derive from '
                       '(default: the one stored in the checkpoint)')
    group.add_argument('--inherit', help='config to inherit (absolute path) '
                       'with only the arch replaced, e.g. '
                       'configs/retrain/atomnas-a_in1k.py')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import_atomnas_mm()
    paths = export(args.src, args.out, args.name, args.config, args.inherit)
    for kind, path in paths.items():
        print(f'{kind}: {path}')
    return paths


if __name__ == '__main__':
    main()
