"""The search settings a checkpoint was written with, checked on resume.

A work_dir resumed with another search setting (a target where there was
none, another deadline, tolerance, cost model, latency table or penalty
schedule) continues the old search under the new rules: a new target past
its deadline cuts hundreds of atoms at once. So every checkpoint written
with an :class:`~atomnas_mm.AtomShrinkHook` records the settings of the
search in ``meta['atomnas_search_settings']``:

* the configured arguments of ``AtomShrinkHook`` and ``BNL1PenaltyHook``
  (``custom_hooks``), with the defaults of their ``__init__`` filled in, so
  that writing a default out changes nothing;
* a latency table (``latency_table``, ``table``) as its file's SHA-256 (the
  path alone may move; a re-measured table at the same path is a change);
* the length of training (``train_cfg.max_epochs`` / ``max_iters``): the
  deadline and the penalty ramp are fractions of it.

A resume whose settings differ stops before training with
:class:`SearchSettingsChanged`, naming the checkpoint and every differing
setting, unless the config sets ``resume_with_changed_search=True``
(``--cfg-options resume_with_changed_search=True``): then the differences
are logged as a warning and the search continues with the new settings.
Checkpoints without the record (written before it existed) are resumed
without the check.
"""
import hashlib
import inspect
import json
import os.path as osp

META_KEY = 'atomnas_search_settings'
SWITCH = 'resume_with_changed_search'
HOOK_TYPES = ('AtomShrinkHook', 'BNL1PenaltyHook')
TABLE_KEYS = ('latency_table', 'table')
_MISSING = '(not set)'


class SearchSettingsChanged(ValueError):
    """A resume with other search settings than its checkpoint's."""


def _type_name(hook_type):
    name = hook_type if isinstance(hook_type, str) else getattr(
        hook_type, '__name__', repr(hook_type))
    return name.rsplit('.', 1)[-1]


def _file_digest(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def _plain(value, key=None):
    """A JSON-like copy of a config value; table files by their digest."""
    if key in TABLE_KEYS and isinstance(value, str) and osp.isfile(value):
        return {'file': value, 'sha256': _file_digest(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _with_defaults(hook_cfg, name):
    kwargs = {k: v for k, v in hook_cfg.items()
              if k not in ('type', 'priority')}
    from ..registry import HOOKS
    cls = HOOKS.get(hook_cfg['type']) if isinstance(
        hook_cfg['type'], str) else hook_cfg['type']
    if cls is None:
        cls = HOOKS.get(f'atomnas_mm.{name}')
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        params = ()
    for p in params:
        if p.name != 'self' and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                           p.KEYWORD_ONLY) \
                and p.name not in kwargs and p.default is not p.empty:
            kwargs[p.name] = p.default
    return kwargs


def search_settings(cfg):
    """The search settings of a config (see the module docstring).

    Args:
        cfg (Config | dict): The run's config (``runner.cfg``).

    Returns:
        dict: JSON-like, keyed by hook type (``AtomShrinkHook``,
        ``BNL1PenaltyHook``; ``#2`` etc. for repeated ones) and
        ``train_cfg``.
    """
    settings = {}
    for hook in cfg.get('custom_hooks') or ():
        if not isinstance(hook, dict) or 'type' not in hook:
            continue
        name = _type_name(hook['type'])
        if name not in HOOK_TYPES:
            continue
        key, n = name, 1
        while key in settings:
            n += 1
            key = f'{name}#{n}'
        settings[key] = _plain(_with_defaults(hook, name))
    train_cfg = cfg.get('train_cfg') or {}
    length = {k: train_cfg[k] for k in ('max_epochs', 'max_iters')
              if k in train_cfg}
    if length:
        settings['train_cfg'] = _plain(length)
    return settings


def _is_table(value):
    return isinstance(value, dict) and set(value) == {'file', 'sha256'}


def _flatten(settings):
    """``{'Hook.argument': value}`` (values kept whole)."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update({f'{key}.{k}': v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _same(a, b):
    if _is_table(a) and _is_table(b):  # the path may move
        return a['sha256'] == b['sha256']
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and \
            not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def _display(value):
    if _is_table(value):
        return f"{value['file']} (sha256 {value['sha256'][:12]})"
    if isinstance(value, dict):
        return {k: _display(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_display(v) for v in value]
    return value


def _show(value):
    if value is _MISSING:
        return _MISSING
    value = _display(value)
    return value if isinstance(value, str) and value.endswith(')') and \
        ' (sha256 ' in value else json.dumps(value)


def differences(saved, now):
    """``[(setting, in the checkpoint, now)]`` of the settings that differ.

    Args:
        saved (dict): ``meta['atomnas_search_settings']`` of a checkpoint.
        now (dict): :func:`search_settings` of the run.
    """
    a, b = _flatten(saved), _flatten(now)
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, _MISSING), b.get(key, _MISSING)
        if not _same(x, y):
            out.append((key, x, y))
    return out


def record(runner, checkpoint):
    """Store the run's search settings in ``checkpoint['meta']``."""
    cfg = getattr(runner, 'cfg', None)
    if cfg is not None:
        checkpoint.setdefault('meta', {})[META_KEY] = search_settings(cfg)


def check_resume(runner, checkpoint):
    """Refuse to resume ``checkpoint`` with other search settings.

    Raises:
        SearchSettingsChanged: The settings differ and the config does not
            set ``resume_with_changed_search=True``. The message names the
            checkpoint and each setting, as saved and as now.
    """
    saved = (checkpoint.get('meta') or {}).get(META_KEY)
    cfg = getattr(runner, 'cfg', None)
    if saved is None or cfg is None:
        return
    diffs = differences(saved, search_settings(cfg))
    if not diffs:
        return
    hub = (checkpoint.get('message_hub') or {}).get('runtime_info') or {}
    where = hub.get('last_ckpt') or f'the checkpoint of {runner.work_dir}'
    listed = '; '.join(f'{key}: {_show(old)} in the checkpoint, {_show(new)}'
                       ' now' for key, old, new in diffs)
    if cfg.get(SWITCH, False) is True:
        runner.logger.warning(
            f'Resuming {where} with changed search settings ({SWITCH}=True): '
            f'{listed}. The search continues under the new settings.')
        return
    raise SearchSettingsChanged(
        f'cannot resume {where}: it was written by a search with other '
        f'settings ({listed}). Resuming would continue that search under '
        'these settings (a new target past its deadline cuts the net at '
        'once). Resume with the config it was started with, start a new '
        f'--work-dir, or pass --cfg-options {SWITCH}=True to resume anyway.')
