"""Export what an AtomNAS search found; put a searched arch into a config.

From a search work_dir (its latest checkpoint, named in ``last_checkpoint``)
or a checkpoint file, :func:`export` writes:

* ``arch.json``: the backbone's complete arch dict (every key of
  :data:`~atomnas_mm.models.backbones.atomnas.ARCH_KEYS` the checkpoint or
  the search config knows), so that ``AtomNAS(arch=json.load(f))`` rebuilds
  the searched network;
* ``<name>.py``: a standalone retrain/eval config with that arch and without
  the search hooks: the search run's own config (stored in the checkpoint,
  or ``config``) or, with ``inherit``, a small file inheriting another config
  by absolute path; it also states ``input_size``, the image side the search
  counted FLOPs at, for the analysis and deployment tools;
* ``<name>.pth``: ``{'state_dict', 'meta': {'atomnas_arch', ...}}`` with the
  EMA weights, loadable with ``torch.load(weights_only=True)``.

About the EMA weights: mmengine's EMAHook swaps the averaged weights into
``checkpoint['state_dict']`` before saving and leaves the *live* weights,
``'module.'``-prefixed, in ``checkpoint['ema_state_dict']``
(``EMAHook._swap_ema_state_dict``). So ``state_dict`` is exported; it holds
the EMA weights whenever EMAHook ran, and the plain weights otherwise.

:func:`inject_archs` is the one place where an arch dict goes into a model
config; :func:`build_from_checkpoint`, :func:`export_onnx` and
:func:`verify_onnx` serve ``tools/deployment/pytorch2onnx.py``,
:func:`input_channels` and :func:`input_size` the analysis tools.
"""
import copy
import json
import os
import os.path as osp
import re
import warnings

import torch

from .models.backbones.atomnas import ARCH_KEYS

# Hooks that only make sense while searching (matched on the type's name).
SEARCH_HOOKS = ('AtomShrinkHook', 'BNL1PenaltyHook')
# Keys an exported arch must have: without them it would silently build
# another network (the stem width defaults to 32).
REQUIRED_KEYS = ('rows', 'stem_channels')
DEFAULT_INPUT_SIZE = 224
# Arch keys that describe the blocks (a search changes them): never taken
# from the search config, never dropped from a module config.
STRUCTURE_KEYS = ('rows', 'stages')


# -- checkpoints ---------------------------------------------------------------
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


# -- arch <-> model config -----------------------------------------------------
def _module_cfg(model_cfg, module_path):
    """The sub-config of ``model_cfg`` at ``module_path`` (``a.b.c``)."""
    node = model_cfg
    for depth, part in enumerate(module_path.split('.')):
        if not hasattr(node, 'get') or node.get(part) is None:
            where = '.'.join(['model'] + module_path.split('.')[:depth])
            raise KeyError(f'{where} has no {part!r}: the config has no '
                           f'module {module_path!r} for the searched arch')
        node = node[part]
    return node


def complete_archs(archs, model_cfg, where):
    """Fill arch keys missing in ``archs`` from the model config.

    Checkpoints written before a key existed lack it (e.g. ``in_channels``);
    the search config's backbone arguments, else its arch dict, give its
    value (stem, head and input widths, activation and SE never change
    during a search; the rows do, so they are never completed).

    Args:
        archs (dict): ``{module_path: arch dict}``.
        model_cfg (dict | None): The search config's ``model``.
        where (str): The checkpoint, for messages.

    Returns:
        dict: New ``{module_path: arch dict}``.

    Raises:
        ValueError: Naming the missing key when an arch lacks one of
            :data:`REQUIRED_KEYS` that the config does not give either.
    """
    out = {}
    for path, arch in archs.items():
        if not isinstance(arch, dict):
            raise ValueError(f'{where}: meta["atomnas_arch"][{path!r}] must '
                             f'be an arch dict, got {arch!r}')
        arch = copy.deepcopy(dict(arch))
        try:
            node = _module_cfg(model_cfg, path) if model_cfg else {}
        except KeyError:
            node = {}
        # The module's arguments override its arch (as in AtomNAS).
        sources = [node] + ([node['arch']] if hasattr(node.get('arch'), 'get')
                            else [])
        for key in ARCH_KEYS:
            value = next((s[key] for s in sources if s.get(key) is not None),
                         None)
            if key not in arch and key not in STRUCTURE_KEYS and \
                    value is not None:
                arch[key] = copy.deepcopy(value)
        for key in REQUIRED_KEYS:
            if key not in arch:
                raise ValueError(
                    f'{where}: the arch of {path!r} has no {key!r} (and the '
                    f'config gives no {path}.{key}); an exported arch needs '
                    f'{list(REQUIRED_KEYS)}')
        out[path] = arch
    return out


def inject_archs(model_cfg, archs, refs=None):
    """Put searched archs into a model config, in place.

    For every ``{module_path: arch}``: the module's ``arch`` becomes the
    arch (or ``refs[module_path]``, e.g. a placeholder), and the module's
    arguments that the arch carries (``stem_channels``, ``in_channels``, ...)
    are dropped, so that the arch alone decides the network.

    Args:
        model_cfg (dict): A model config (``cfg.model``).
        archs (dict): ``{module_path: arch dict}``.
        refs (dict, optional): ``{module_path: value}`` to store instead.

    Returns:
        dict: ``model_cfg``.

    Raises:
        KeyError: Naming the path when the config has no such module.
    """
    for path, arch in archs.items():
        node = _module_cfg(model_cfg, path)
        for key in ARCH_KEYS:
            if key not in STRUCTURE_KEYS and key in arch:
                node.pop(key, None)
        node['arch'] = refs[path] if refs is not None else arch
    return model_cfg


def strip_search(cfg, archs, refs=None):
    """Make a search config a retrain/eval config of the searched net.

    Sets the archs (:func:`inject_archs`), records :func:`input_size` as the
    top-level ``input_size``, drops the search hooks (a BNL1PenaltyHook with
    ``weight_decay`` stays as ``rho=0``: the recipe's weight decay lives in
    it), ``load_from``/``resume``/``work_dir``, and adds a test split (the
    val split) when the config has none. ``cfg`` is changed in place.
    """
    size = input_size(cfg)
    inject_archs(cfg.model, archs, refs)
    cfg.input_size = size[0] if size[0] == size[1] else list(size)
    hooks = []
    for hook in cfg.get('custom_hooks', None) or []:
        kind = str(hook.get('type', ''))
        if kind.endswith('BNL1PenaltyHook') and hook.get('weight_decay'):
            hooks.append(dict(type=kind, rho=0,
                              weight_decay=hook['weight_decay']))
        elif not kind.endswith(SEARCH_HOOKS):
            hooks.append(hook)
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


def arch_json(arch):
    """JSON text of an arch dict, one row per line."""
    rows = ',\n'.join(f'  {json.dumps(list(row))}' for row in arch['rows'])
    rest = ''.join(f',\n {json.dumps(k)}: {json.dumps(v)}'
                   for k, v in arch.items() if k != 'rows')
    return f'{{"rows": [\n{rows}\n ]{rest}\n}}\n'


def _search_cfg(ckpt, path, config=None):
    """The search config: ``config`` or the one stored in the checkpoint."""
    from mmengine.config import Config
    if config is not None:
        return Config.fromfile(config)
    text = ckpt.get('meta', {}).get('cfg')
    if not text:
        return None
    return Config.fromstring(text, '.py')


def export_config(ckpt, archs, path, config=None, inherit=None):
    """Text of the exported config.

    Every arch is a top-level variable (``arch`` for the backbone) that the
    model refers to.

    Args:
        ckpt (dict): The loaded checkpoint (its ``meta['cfg']`` is the
            search config when ``config`` is None).
        archs (dict): ``{module_path: arch dict}``, complete
            (:func:`complete_archs`).
        path (str): Checkpoint path, for messages.
        config (str, optional): Search config file to derive from.
        inherit (str, optional): Config to inherit by absolute path instead.
    """
    header = f'# Searched AtomNAS net exported from {osp.abspath(path)}\n'
    arch_text = '\n'.join(format_arch(arch_var(p), a)
                          for p, a in archs.items())
    if inherit is not None:
        if not osp.isfile(inherit):
            raise FileNotFoundError(f'--inherit: {inherit} does not exist')
        lines = [header, f'_base_ = [{osp.abspath(inherit)!r}]\n', arch_text]
        search = _search_cfg(ckpt, path, config)
        if search is not None:
            size = input_size(search)
            value = size[0] if size[0] == size[1] else list(size)
            lines.append(f'input_size = {value!r}\n')
        for module_path in archs:
            # The base's arch may be a zoo name: replace, do not merge.
            value = f'dict(_delete_=True, **{arch_var(module_path)})'
            for part in reversed(module_path.split('.') + ['arch']):
                value = f'dict({part}={value})'
            lines.append(f'model = {value}\n')
        return '\n'.join(lines)
    cfg = _search_cfg(ckpt, path, config)
    if cfg is None:
        raise ValueError(f'{path}: no config stored in meta["cfg"]; '
                         'pass --config or --inherit')
    placeholders = {p: f'__atomnas_arch_{i}__' for i, p in enumerate(archs)}
    text = strip_search(cfg, archs, placeholders).pretty_text
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
    """Export a search run: arch.json, a standalone config, the weights.

    Args:
        src (str): A search work_dir (its ``last_checkpoint``) or a
            checkpoint file.
        out (str): Output directory (created).
        name (str, optional): File name of the config and checkpoint;
            defaults to the search config's name (``config``, else the
            one the run was started with), else the work_dir's.
        config (str, optional): Search config to derive from (default: the
            one stored in the checkpoint).
        inherit (str, optional): Config to inherit with only the arch
            replaced, instead.

    Returns:
        dict: ``arch``, ``config`` and ``checkpoint`` paths.
    """
    path = find_checkpoint(src)
    ckpt = load_checkpoint(path)
    meta = ckpt.get('meta', {})
    if not meta.get('atomnas_arch') and meta.get('channel_units'):
        return export_channels(ckpt, path, out, name, config, inherit, src)
    search = _search_cfg(ckpt, path, config)
    archs = complete_archs(searched_archs(ckpt, path),
                           search.model if search is not None else None, path)
    arch = archs[backbone_path(archs, path)]
    name = _export_name(name, src, path, ckpt, config)
    os.makedirs(out, exist_ok=True)
    paths = dict(arch=osp.join(out, 'arch.json'),
                 config=osp.join(out, f'{name}.py'),
                 checkpoint=osp.join(out, f'{name}.pth'))
    text = export_config(ckpt, archs, path, config, inherit)
    with open(paths['arch'], 'w') as f:
        f.write(arch_json(arch))
    with open(paths['config'], 'w') as f:
        f.write(text)
    torch.save(export_checkpoint(ckpt, archs), paths['checkpoint'])
    return paths


def _export_name(name, src, path, ckpt, config=None):
    """The exported files' name: ``name``, else the search config's (the
    ``config`` given, else the one the run was started with, from the
    checkpoint's ``experiment_name``), else the work_dir's."""
    if name is not None:
        return name
    if config is not None:
        return osp.splitext(osp.basename(config))[0]
    started = re.fullmatch(r'(.+)_\d{8}_\d{6}',
                           str(ckpt.get('meta', {}).get('experiment_name')))
    if started:
        return started.group(1)
    base = src if osp.isdir(src) else osp.dirname(osp.abspath(path))
    return osp.basename(osp.normpath(base)) or 'searched'


def narrowed_backbone_cfg(model_cfg, widths, path):
    """``model_cfg`` (a copy) whose backbone is built narrowed to the
    searched widths (``atomnas_mm.Narrowed``); its ``init_cfg`` is dropped
    (the exported checkpoint holds the weights)."""
    prefix = 'backbone.'
    outside = [n for n in widths if not n.startswith(prefix)]
    if outside:
        raise ValueError(f'{path}: channel unit {outside[0]!r} is outside '
                         'the backbone; only backbones are exported')
    model_cfg = copy.deepcopy(model_cfg)
    inner = dict(model_cfg['backbone'])
    inner.pop('init_cfg', None)
    model_cfg['backbone'] = dict(
        type='atomnas_mm.Narrowed', model=inner,
        channel_units={n[len(prefix):]: list(w) for n, w in widths.items()})
    return model_cfg


def reaches_outside_backbone(cfg, widths):
    """Whether a unit of ``widths`` has readers outside the backbone (e.g.
    MobileNetV2's last conv, read by the classifier's fc): then the whole
    model, not the backbone alone, is built narrowed."""
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    from .search.units import find_units
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.pop('init_cfg', None)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    model = MODELS.build(model_cfg)
    backbone = getattr(model, 'backbone', None)
    if backbone is None:
        return False
    inside = {id(m) for m in backbone.modules()}
    units = find_units(model, frozen=True)
    return any(id(layer) not in inside for name in widths if name in units
               for layer, _ in units[name].consumers)


def export_channels(ckpt, path, out, name=None, config=None, inherit=None,
                    src=None):
    """:func:`export` for a search on a stock model (channel units):
    ``channel_units.json``, a config whose backbone is
    ``atomnas_mm.Narrowed`` around the search config's, and the weights."""
    if inherit is not None:
        raise ValueError('--inherit: the export of a stock-model search '
                         'derives from its search config (--config)')
    widths = ckpt['meta']['channel_units']
    cfg = _search_cfg(ckpt, path, config)
    if cfg is None:
        raise ValueError(f'{path}: no config stored in meta["cfg"]; '
                         'pass --config')
    strip_search(cfg, {})
    if reaches_outside_backbone(cfg, widths):
        model_cfg = copy.deepcopy(cfg.model)
        model_cfg.pop('init_cfg', None)
        cfg.model = dict(type='atomnas_mm.Narrowed', model=model_cfg,
                         channel_units={n: list(w) for n, w in widths.items()})
    else:
        cfg.model = narrowed_backbone_cfg(cfg.model, widths, path)
    name = _export_name(name, src or path, path, ckpt, config)
    os.makedirs(out, exist_ok=True)
    paths = dict(arch=osp.join(out, 'channel_units.json'),
                 config=osp.join(out, f'{name}.py'),
                 checkpoint=osp.join(out, f'{name}.pth'))
    header = (f'# Searched net exported from {osp.abspath(path)}: the search '
              'config\'s backbone narrowed to the searched widths\n')
    with open(paths['arch'], 'w') as f:
        json.dump(widths, f, indent=1)
    with open(paths['config'], 'w') as f:
        f.write(header + cfg.pretty_text)
    exported = export_checkpoint(ckpt, {})
    exported['meta']['channel_units'] = widths
    torch.save(exported, paths['checkpoint'])
    return paths


# -- input of a model ----------------------------------------------------------
def input_channels(model):
    """Image channels ``model`` expects (1 for the grey demo, 3 for RGB).

    An AtomNAS backbone's ``in_channels``, else the input channels of the
    first Conv2d (other backbones' ``in_channels`` may be anything:
    mmpretrain's MobileNetV2 leaves its last layer's there).
    """
    from .models import AtomNAS
    backbone = getattr(model, 'backbone', None)
    if isinstance(backbone, AtomNAS):
        return backbone.in_channels
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
    raise ValueError(f'{type(model).__name__}: cannot tell its input '
                     'channels (no backbone.in_channels, no Conv2d)')


def _pair(value, where):
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) for v in value):
        return tuple(value)
    raise ValueError(f'{where}: expected an int or [H, W], got {value!r}')


def input_size(cfg):
    """``(H, W)`` of the images a config's model sees, for measuring it.

    In this order: the top-level ``input_size`` (written by :func:`export`),
    the ``input_size`` of an AtomShrinkHook (the side the search counted
    FLOPs at), the ``crop_size`` of a CenterCrop in the test pipeline, else
    224.
    """
    if cfg.get('input_size') is not None:
        return _pair(cfg['input_size'], 'input_size')
    for hook in cfg.get('custom_hooks', None) or []:
        if str(hook.get('type', '')).endswith('AtomShrinkHook'):
            return _pair(hook.get('input_size', DEFAULT_INPUT_SIZE),
                         'AtomShrinkHook.input_size')
    loader = cfg.get('test_dataloader', None) or cfg.get('val_dataloader',
                                                         None) or {}
    pipeline = (loader.get('dataset') or {}).get('pipeline') or []
    for transform in reversed(pipeline):
        if str(transform.get('type', '')).endswith('CenterCrop') and \
                transform.get('crop_size') is not None:
            width, height = _pair(transform['crop_size'],
                                  'CenterCrop.crop_size')  # mmcv: (w, h)
            return (height, width)
    return (DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE)


# -- ONNX ------------------------------------------------------------------------
def build_from_checkpoint(config, checkpoint):
    """The model of ``config`` with the weights of ``checkpoint``, in eval.

    When the checkpoint stores searched archs (``meta['atomnas_arch']``),
    the model is built with them (:func:`inject_archs`), and its channel
    units are narrowed to ``meta['channel_units']``, so a search checkpoint
    loads with its unedited search config.

    Args:
        config (str | Config): Config file or object.
        checkpoint (str): Checkpoint file.
    """
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(config) if isinstance(config, str) else config
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'CHECKPOINT: {checkpoint} does not exist')
    ckpt = load_checkpoint(checkpoint)
    model_cfg = copy.deepcopy(cfg.model)
    archs = ckpt.get('meta', {}).get('atomnas_arch') or {}
    archs = complete_archs(archs, model_cfg, checkpoint)
    inject_archs(model_cfg, archs)
    for path in archs:
        _module_cfg(model_cfg, path)['init_cfg'] = None
    model_cfg.pop('init_cfg', None)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    model = MODELS.build(model_cfg)
    widths = ckpt.get('meta', {}).get('channel_units')
    if widths:  # a searched stock model: its units narrowed first
        from .search.shrink import narrow_to_widths
        narrow_to_widths(model, widths)
    model.load_state_dict(ckpt['state_dict'], strict=True)
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


#: Export forms of ``export_onnx``: the ONNX Runtime form's part choice
#: (:data:`atomnas_mm.models.deploy_onnx.MERGE_MODES`) or ``'modules'``, the
#: modules as built (the form before issue 21; 0.4-0.5x slower there).
EXPORT_FORMS = ('auto', 'split', 'merged', 'modules')


def export_onnx(model, out, shape=(224, 224), opset=17, softmax=False,
                merge='merged', align=None):
    """Write an mmpretrain classifier to ONNX with a dynamic batch.

    The graph takes the normalised batch (what the config's
    ``data_preprocessor`` produces), ``[N, C, H, W]`` with ``C`` =
    :func:`input_channels`, and returns ``[N, num_classes]`` logits
    (probabilities with ``softmax``). Uses torch's TorchScript exporter
    (``dynamo=False``), which needs only the ``onnx`` package.

    The graph is the exact ONNX Runtime form of
    :func:`atomnas_mm.models.deploy_onnx.onnx_model` (BN folded, each
    AtomNAS block's kernel groups in parts widened with zero channels to a
    multiple of ``align``; ``'merged'``: one depthwise conv per block, the
    fastest measured), unless ``merge='modules'``.

    Args:
        merge (str): One of :data:`EXPORT_FORMS`.
        align (int, optional): Channel alignment (default
            :data:`~atomnas_mm.models.deploy_onnx.DEFAULT_ALIGN`; 1: none).

    Returns:
        torch.nn.Module: The unconverted model wrapped as exported (for
        :func:`verify_onnx`: the reference outputs).
    """
    from .models.deploy_onnx import DEFAULT_ALIGN, onnx_model
    if merge not in EXPORT_FORMS:
        raise ValueError(f'--deploy-form must be one of {EXPORT_FORMS}, got '
                         f'{merge!r}')
    if align is None:
        align = DEFAULT_ALIGN
    if not isinstance(align, int) or isinstance(align, bool) or align < 1:
        raise ValueError(f'--align must be a positive int, got {align!r}')
    module = OnnxClassifier(model, softmax).eval()
    dummy = torch.randn(1, input_channels(model), *shape)
    exported = module if merge == 'modules' else onnx_model(
        module, dummy, align=align, merge=merge)
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (the dynamo one needs
        # onnxscript); torch warns that it is the legacy one.
        warnings.filterwarnings('ignore', category=DeprecationWarning,
                                message='You are using the legacy '
                                'TorchScript-based ONNX export')
        warnings.filterwarnings('ignore', category=DeprecationWarning,
                                message='The feature will be removed')
        torch.onnx.export(
            exported, (dummy, ), out, dynamo=False, opset_version=opset,
            input_names=['input'], output_names=['output'],
            dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}})
    return module


def verify_onnx(module, out, shape, batches=(1, 3)):
    """Max ``|onnxruntime - PyTorch|`` over random batches of each size."""
    import numpy as np
    import onnxruntime
    session = onnxruntime.InferenceSession(
        out, providers=['CPUExecutionProvider'])
    channels = input_channels(module.model)
    errors = {}
    for n in batches:
        x = torch.randn(n, channels, *shape)
        with torch.no_grad():
            expected = module(x).numpy()
        got = session.run(None, {'input': x.numpy()})[0]
        errors[n] = float(np.abs(got - expected).max())
    return errors
