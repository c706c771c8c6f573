"""Keep mmengine checkpoints loadable with ``torch.load(weights_only=True)``.

mmengine 0.10.7 stores its message hub (``HistoryBuffer`` objects holding
numpy arrays) in every checkpoint. ``HistoryBuffer.__getstate__`` also adds the
class-wide table of statistics functions, which pickles as
``getattr(HistoryBuffer, 'min')`` and so needs ``builtins.getattr`` at load
time. Allowlisting ``getattr`` would let any checkpoint reach any attribute of
any allowlisted object, so instead:

* ``HistoryBuffer`` pickles without that table (``copyreg``): its
  ``__setstate__`` restores the default statistics anyway, and custom ones are
  registered on the class by the code that defines them. Checkpoints written
  in a process that imported atomnas_mm hold only data.
* Checkpoints written by stock mmengine (without atomnas_mm) carry the table;
  for them ``builtins.getattr`` resolves to :func:`history_buffer_getattr`,
  which returns only statistics functions of ``HistoryBuffer`` and rejects
  every other lookup.
* The remaining harmless types (``HistoryBuffer``, numpy arrays, scalars and
  dtypes) are allowlisted. ``weights_only`` stays on for every file.

It also makes checkpoints safe to write and clear to read:

* :class:`SafeCheckpointHook` (``atomnas_mm.SafeCheckpointHook``, used by the
  shipped configs): mmengine's CheckpointHook with atomic writes and with
  outdated checkpoints removed only after the new one and ``last_checkpoint``
  are in place, so a kill at any moment leaves a checkpoint that ``--resume``
  finds.
* mmengine's local checkpoint loader (``CheckpointLoader`` scheme ``''``,
  behind ``Runner.load_checkpoint``/``resume``, ``load_from``,
  ``mmengine.runner.load_checkpoint``, ``init_cfg=Pretrained`` and
  ``mmpretrain.get_model(pretrained=...)``) is replaced by
  :func:`load_from_local`: it checks the CRC-32 of every record of a zip
  checkpoint and raises :class:`UnreadableCheckpointError` naming the file
  for an empty, truncated, corrupted or foreign file.
* ``mmengine.runner.checkpoint.load_state_dict`` is wrapped by
  :func:`load_state_dict`: for a model holding an AtomNAS backbone, missing
  and unexpected keys and shape mismatches raise
  :class:`CheckpointMismatchError` naming the keys instead of a warning.
"""
import copyreg
import glob
import logging
import os.path as osp
import pickle
import zipfile

import mmengine.runner
import mmengine.runner._flexible_runner as _flexible_runner
import mmengine.runner.checkpoint as mm_checkpoint
import mmengine.runner.runner
import numpy as np
import torch
from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.runner.checkpoint import CheckpointLoader

from .fileio import ATOMIC_BACKEND, atomic_write_text, remove_stale_temp_files
from .registry import HOOKS


_STATISTICS = ('min', 'max', 'current', 'mean')  # HistoryBuffer's defaults


def _reduce_history_buffer(buffer):
    """Pickle a HistoryBuffer as its data only (no statistics functions)."""
    state = {k: v for k, v in vars(buffer).items()
             if k != 'statistics_methods'}
    return copyreg.__newobj__, (HistoryBuffer, ), state


def history_buffer_getattr(obj, name):
    """``getattr`` restricted to the statistics functions of HistoryBuffer.

    Stands in for ``builtins.getattr`` while unpickling with
    ``weights_only=True``.

    Raises:
        pickle.UnpicklingError: For any other object or attribute.
    """
    if obj is HistoryBuffer and name in _STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'getattr({obj!r}, {name!r}) is not allowed in a weights_only '
        'checkpoint (only HistoryBuffer statistics functions are)')


SAFE_GLOBALS = [
    HistoryBuffer,
    np.ndarray,
    np.dtype,
    np._core.multiarray._reconstruct,
    np._core.multiarray.scalar,
    (history_buffer_getattr, 'builtins.getattr'),
] + [type(np.dtype(t)) for t in (
    'float64', 'float32', 'float16', 'int64', 'int32', 'int16', 'int8',
    'uint8', 'bool')]

copyreg.pickle(HistoryBuffer, _reduce_history_buffer)
torch.serialization.add_safe_globals(SAFE_GLOBALS)


# -- reading --------------------------------------------------------------
class UnreadableCheckpointError(pickle.UnpicklingError):
    """A file that is not a readable checkpoint.

    Empty, truncated or corrupted files, files that are no checkpoint, and
    files holding objects that ``torch.load(weights_only=True)`` refuses. A
    subclass of ``pickle.UnpicklingError``, which torch raises for the last.
    """


def _zip_check(filename):
    """``(damage, verified)`` of a file: why it is a damaged zip checkpoint
    (None if it is not) and whether the CRC-32 of its records were checked.

    A zip checkpoint (torch's format since 1.6) carries a CRC-32 per record;
    reading them all finds truncation and flipped bytes anywhere in the file,
    tensor data included (``torch.load`` does not check them).
    """
    with open(filename, 'rb') as f:
        magic = f.read(4)
    if not magic:
        return 'an empty file', False
    if not zipfile.is_zipfile(filename):
        return ('truncated: a zip checkpoint without its central directory'
                if magic == b'PK\x03\x04' else None), False
    try:
        with zipfile.ZipFile(filename) as archive:
            if not any(info.CRC for info in archive.infolist()):
                return None, False  # written without CRC-32 (torch's config)
            bad = archive.testzip()
    except Exception as e:  # noqa: B902  (any damage of the zip structure)
        return f'damaged zip structure ({type(e).__name__}: {e})', False
    if bad is not None:
        return f'record {bad!r} fails its CRC-32 check', False
    return None, True


def _first_line(error):
    """The telling line of a torch.load error (its messages are long)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if 'WeightsUnpickler error' in line:
            return line
    return f'{type(error).__name__}: {lines[0] if lines else ""}'.rstrip(': ')


def read_checkpoint(filename, map_location=None):
    """``torch.load(filename, weights_only=True)`` with clear errors.

    Args:
        filename (str): A local checkpoint file.
        map_location: As for :func:`torch.load`.

    Returns:
        The loaded object.

    Raises:
        UnreadableCheckpointError: The file is empty, truncated, corrupted,
            not a checkpoint, or holds objects weights_only refuses. The
            message names the file.
    """
    damage, verified = _zip_check(filename)
    cause = None
    if damage is None:
        try:
            return torch.load(filename, map_location=map_location,
                              weights_only=True)
        except pickle.UnpicklingError as e:
            if verified:  # intact: a refusal
                raise UnreadableCheckpointError(
                    f'{filename} is not a readable checkpoint: '
                    'torch.load(weights_only=True) refuses what it holds '
                    f'({_first_line(e)}). Load it with weights_only=False '
                    'only if you trust where it comes from.') from e
            damage, cause = _first_line(e), e
        except Exception as e:  # noqa: B902  (any reader failure)
            # An intact file fails for other reasons (e.g. map_location),
            # unless it is a zip file but no torch checkpoint.
            if verified and 'PytorchStreamReader' not in str(e):
                raise
            damage, cause = _first_line(e), e
    raise UnreadableCheckpointError(
        f'{filename} is not a readable checkpoint ({damage}). It is empty, '
        'truncated or corrupted (e.g. by a kill or a full disk while it was '
        'written), or not a checkpoint; use another checkpoint.') from cause


def load_from_local(filename, map_location):
    """mmengine's loader for local paths, with :func:`read_checkpoint`."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return read_checkpoint(filename, map_location)


CheckpointLoader.register_scheme(prefixes='', loader=load_from_local,
                                 force=True)


def checkpoint_damage(filename):
    """Why ``filename`` cannot be resumed from (None when it looks intact:
    it exists and its zip records pass their CRC-32 check)."""
    if not osp.isfile(filename):
        return 'missing'
    try:
        return _zip_check(filename)[0]
    except OSError as e:
        return str(e)


_mmengine_find_latest = mm_checkpoint.find_latest_checkpoint


def find_latest_checkpoint(path):
    """mmengine's ``find_latest_checkpoint`` that skips damaged files.

    ``last_checkpoint`` names the newest checkpoint. When that file is
    missing or damaged (truncated by a full disk, a kill of a writer that
    is not atomic), the newest intact ``*.pth`` beside it is returned
    instead, with a warning naming the file skipped. When none is intact,
    the named file is returned: loading it raises an error naming it.

    Args:
        path (str): The work_dir.

    Returns:
        str | None: The checkpoint to resume from.
    """
    last = _mmengine_find_latest(path)
    if last is None or '://' in last:
        return last
    damage = checkpoint_damage(last)
    if damage is None:
        return last
    folders = dict.fromkeys([osp.dirname(osp.abspath(last)),
                             osp.abspath(path)])
    candidates = sorted(
        {f for folder in folders for f in glob.glob(
            osp.join(glob.escape(folder), '*.pth'))} - {osp.abspath(last)},
        key=osp.getmtime, reverse=True)
    for candidate in candidates:
        if checkpoint_damage(candidate) is None:
            print_log(f'The latest checkpoint {last} cannot be resumed from '
                      f'({damage}); resuming from the newest intact one, '
                      f'{candidate}: the training since then is repeated.',
                      logger='current', level=logging.WARNING)
            return candidate
    return last


for _module in (mmengine.runner.runner, _flexible_runner):
    _module.find_latest_checkpoint = find_latest_checkpoint


# -- loading into a model ---------------------------------------------------
class CheckpointMismatchError(RuntimeError):
    """A state_dict that does not fit a model holding an AtomNAS backbone."""


def _unwrap(module):
    while is_model_wrapper(module) or isinstance(module, BaseTTAModel):
        module = module.module
    return module


def _atomnas_backbones(module):
    """``{state-dict prefix: backbone}`` of the AtomNAS backbones in
    ``module`` (prefix ``'backbone.'``, or ``''`` for the backbone itself)."""
    from .models import AtomNAS
    return {f'{name}.' if name else '': m for name, m in
            _unwrap(module).named_modules() if isinstance(m, AtomNAS)}


def atomnas_prefixes(module):
    """State-dict prefixes of the AtomNAS backbones in ``module``."""
    return list(_atomnas_backbones(module))


def key_mismatches(module, state_dict, skip=()):
    """Missing keys, unexpected keys and shape mismatches of a state_dict.

    Args:
        module (nn.Module): The model (wrappers are looked through).
        state_dict (Mapping): Keys relative to ``module``.
        skip (Sequence[str]): Key prefixes to leave out.

    Returns:
        tuple[list, list, list]: Missing keys (BN ``num_batches_tracked``
        left out, as mmengine does), unexpected keys, and
        ``(key, checkpoint shape, model shape)`` triples.
    """
    own = _unwrap(module).state_dict()

    def kept(key):
        return not any(key.startswith(p) for p in skip)

    missing = [k for k in own if k not in state_dict and kept(k)
               and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state_dict if k not in own and kept(k)]
    shapes = [(k, tuple(state_dict[k].shape), tuple(own[k].shape))
              for k in own if k in state_dict and kept(k)
              and hasattr(state_dict[k], 'shape')
              and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, shapes


def _listed(keys, limit=6, sep=', '):
    more = f'{sep}... ({len(keys) - limit} more)' if len(keys) > limit else ''
    return sep.join(map(str, keys[:limit])) + more


def _mismatch_message(missing, unexpected, shapes, prefixes):
    parts = []
    if missing:
        parts.append(f'{len(missing)} keys missing from the checkpoint '
                     f'({_listed(missing)})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected keys ('
                     f'{_listed(unexpected)})')
    if shapes:
        parts.append(f'{len(shapes)} shape mismatches (' + _listed(
            [f'{k}: checkpoint {c}, model {m}' for k, c, m in shapes],
            sep='; ') + ')')
    backbones = ', '.join(repr(p.rstrip('.')) for p in prefixes)
    message = ('The checkpoint does not fit the model with the AtomNAS '
               f'backbone {backbones}: ' + '; '.join(parts) + '.')
    lacked = [m[:-len(u)] for m in missing for u in unexpected
              if m.endswith('.' + u)]
    carried = [u[:-len(m)] for m in missing for u in unexpected
               if u.endswith('.' + m)]
    if lacked:
        prefix = lacked[0]
        message += (f" Its keys lack the prefix {prefix!r} (a state_dict of "
                    "the bare backbone?): load it into the backbone with "
                    f"model.{prefix.rstrip('.')}.init_cfg=dict("
                    "type='Pretrained', checkpoint=<file>).")
    elif carried:
        message += (f' Its keys carry the prefix {carried[0]!r}: use '
                    "init_cfg=dict(type='Pretrained', checkpoint=<file>, "
                    f'prefix={carried[0]!r}).')
    elif any(not any(k.startswith(p) for p in prefixes if p)
             for k, _, _ in shapes):
        message += (' The layers outside the backbone differ (e.g. another '
                    'num_classes): to take only the backbone weights, set '
                    "model.backbone.init_cfg=dict(type='Pretrained', "
                    "checkpoint=<file>, prefix='backbone.') instead of "
                    'load_from.')
    return message


def check_state_dict(module, state_dict, skip=()):
    """Raise if ``state_dict`` does not fit ``module`` exactly.

    Raises:
        CheckpointMismatchError: Naming the missing and unexpected keys and
            the shape mismatches (see :func:`key_mismatches`).
    """
    missing, unexpected, shapes = key_mismatches(module, state_dict, skip)
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(_mismatch_message(
            missing, unexpected, shapes, atomnas_prefixes(module)))


_mmengine_load_state_dict = getattr(mm_checkpoint.load_state_dict,
                                    '__wrapped__',
                                    mm_checkpoint.load_state_dict)


def load_state_dict(module, state_dict, strict=False, logger=None):
    """mmengine's ``load_state_dict``, strict for AtomNAS models.

    For a module without an AtomNAS backbone it is mmengine's function,
    after the module's channel units narrower in ``state_dict`` (a searched
    stock model) are narrowed to it. For
    one with, every key must be in both and shapes must agree, whatever
    ``strict`` says. What can be decided before loading (the layers outside
    the backbones, a backbone without any key in the checkpoint) is checked
    first, so such a checkpoint is not loaded at all; the backbones reshape
    themselves to the checkpoint's architecture while loading and are
    checked after.

    ``init_cfg=dict(type='Pretrained', prefix='backbone.')`` loads the
    backbone part of a checkpoint into the backbone: all of the backbone's
    keys must be there, the rest of the checkpoint is not looked at.

    Raises:
        CheckpointMismatchError: See :func:`check_state_dict`.
    """
    backbones = _atomnas_backbones(module)
    if not backbones:
        from .search.shrink import narrow_to_state_dict
        remap = narrow_to_state_dict(_unwrap(module), state_dict)
        if remap:  # for AtomShrinkHook: optimizer and EMA copy follow
            _unwrap(module).__dict__.setdefault('load_remap', {}).update(
                remap)
        return _mmengine_load_state_dict(module, state_dict, strict, logger)
    # A backbone is in the checkpoint when some of its keys are (those of
    # the stem are in every architecture); it is checked after loading.
    present = [p for p, m in backbones.items()
               if any(p + k in state_dict for k in m.state_dict())]
    check_state_dict(module, state_dict, skip=present)
    _mmengine_load_state_dict(module, state_dict, strict, logger)
    check_state_dict(module, state_dict)


load_state_dict.__wrapped__ = _mmengine_load_state_dict
mm_checkpoint.load_state_dict = load_state_dict
mmengine.runner.load_state_dict = load_state_dict


# -- writing -----------------------------------------------------------------
class _DeferRemoval:
    """A file backend whose ``remove``/``rmtree`` only note the path."""

    def __init__(self, backend, pending):
        self._backend, self._pending = backend, pending

    def remove(self, path):
        self._pending.append(path)

    rmtree = remove

    def __getattr__(self, name):
        return getattr(self._backend, name)


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """mmengine's CheckpointHook that a kill at any moment cannot break.

    Same arguments, files and ``last_checkpoint`` as
    :class:`mmengine.hooks.CheckpointHook`, with three changes:

    * a checkpoint (and a best checkpoint) is written to a temporary file in
      ``out_dir``, fsynced and renamed over its name
      (:class:`atomnas_mm.fileio.AtomicLocalBackend`), so a file with a
      checkpoint's name is always complete;
    * ``last_checkpoint`` is written the same way, after the checkpoint;
    * outdated checkpoints (beyond ``max_keep_ckpts``, the previous best)
      are removed only after that. The paths to remove are stored in the
      message hub of the new checkpoint, so that removals a kill
      interrupted are done when the run resumes, with the temporary files
      a kill left.

    * with ``exact_resume=True`` (default) every checkpoint records the
      position within its epoch and the random states, and a resume
      continues at the next batch with the same random draws as the
      uninterrupted run (:mod:`atomnas_mm.engine.resume`); each sample is
      then loaded with its RNGs seeded from ``(seed, epoch, index)``.

    With ``backend_args`` for another storage backend or ``out_dir`` a URL,
    the writes go through that backend (object stores replace whole files)
    and only the order of writes and removals changes.
    """

    PENDING_KEY = 'atomnas_stale_checkpoints'

    def __init__(self, *args, exact_resume=True, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(exact_resume, bool):
            raise ValueError(
                f'exact_resume: must be a bool, got {exact_resume!r}')
        from .engine.resume import ExactResume
        self.exact = ExactResume() if exact_resume else None

    def before_save_checkpoint(self, runner, checkpoint):
        if self.exact is not None:
            self.exact.before_save_checkpoint(runner, checkpoint)

    def after_load_checkpoint(self, runner, checkpoint):
        if self.exact is not None:
            self.exact.after_load_checkpoint(runner, checkpoint)

    def after_train_epoch(self, runner):
        super().after_train_epoch(runner)
        if self.exact is not None:
            self.exact.after_train_epoch(runner)

    def before_train(self, runner):
        if self.exact is not None:
            self.exact.before_train(runner)
        local = self.out_dir is None or '://' not in str(self.out_dir)
        self.atomic = (local and self.file_client_args is None
                       and self.backend_args in (None, dict(backend='local')))
        if self.atomic:
            self.backend_args = dict(backend=ATOMIC_BACKEND)
        super().before_train(runner)
        self._pending = list(runner.message_hub.get_info(self.PENDING_KEY)
                             or [])
        if is_main_process():
            if self.atomic:
                ext = osp.splitext(self.filename_tmpl)[1]
                remove_stale_temp_files(
                    self.out_dir, lambda name: name.endswith(ext))
                # and those of the other files a run writes there (a kill
                # while searched_arch.json or a picture was written)
                remove_stale_temp_files(
                    runner.work_dir, lambda name: name == 'last_checkpoint'
                    or name.endswith(('.json', '.png', ext)))
            self._remove_pending(runner)

    def _path(self, step):
        return self.file_backend.join_path(self.out_dir,
                                           self.filename_tmpl.format(step))

    def _current(self):
        """Checkpoints in use: never removed."""
        paths = {self.last_ckpt, getattr(self, 'best_ckpt_path', None)}
        paths.update(getattr(self, 'best_ckpt_path_dict', {}).values())
        paths.update(self._path(s) for s in getattr(self, 'keep_ckpt_ids', ()))
        return paths

    def _remove_pending(self, runner):
        if is_main_process():
            backend = getattr(self.file_backend, '_backend', self.file_backend)
            current = self._current()
            for path in dict.fromkeys(self._pending):
                if path in current:
                    continue
                if backend.isfile(path):
                    backend.remove(path)
                elif backend.isdir(path):  # deepspeed checkpoints
                    backend.rmtree(path)
        self._pending.clear()
        runner.message_hub.update_info(self.PENDING_KEY, [])

    def _save_checkpoint_with_step(self, runner, step, meta):
        ids = getattr(self, 'keep_ckpt_ids', None)
        if self.max_keep_ckpts > 0 and not (ids and ids[-1] == step):
            if len(ids) == self.max_keep_ckpts:
                self._pending.append(self._path(ids.popleft()))
            ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(ids))
        runner.message_hub.update_info(self.PENDING_KEY, list(self._pending))
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        if self.exact is not None:
            self.exact.gather()
        runner.save_checkpoint(
            self.out_dir, filename, self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler, meta=meta,
            by_epoch=self.by_epoch, backend_args=self.backend_args,
            **self.args)
        if is_main_process():
            atomic_write_text(osp.join(runner.work_dir, 'last_checkpoint'),
                              self.last_ckpt)
        self._remove_pending(runner)

    def _save_best_checkpoint(self, runner, metrics):
        backend = self.file_backend
        self.file_backend = _DeferRemoval(backend, self._pending)
        if self.exact is not None:
            self.exact.gather()
        try:
            super()._save_best_checkpoint(runner, metrics)
        finally:
            self.file_backend = backend
        if self._pending:
            self._remove_pending(runner)
