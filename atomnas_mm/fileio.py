"""Atomic file writes: a reader sees the old file or the new one, never a part.

Each writer puts the data into a temporary file in the target's folder
(``.<name>.<8 hex>.tmp``), flushes and fsyncs it, renames it over the target
with :func:`os.replace` (atomic on POSIX within one file system) and fsyncs
the folder. A kill or a full disk at any byte leaves the previous file as it
was; the temporary file is removed when the write fails in Python, and a kill
leaves at most a stale ``.tmp`` file beside the target
(:func:`remove_stale_temp_files` clears them).

:class:`AtomicLocalBackend` is mmengine's ``LocalBackend`` with these writes,
registered as the file backend ``'atomnas_atomic_local'``.
"""
import glob
import json
import os
import os.path as osp
import re
import secrets

from mmengine.fileio import LocalBackend, register_backend

ATOMIC_BACKEND = 'atomnas_atomic_local'
_TEMP_RE = re.compile(r'^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$')


def temp_path(path):
    """A fresh temporary name beside ``path`` (``.<name>.<8 hex>.tmp``)."""
    folder, name = osp.split(osp.abspath(path))
    return osp.join(folder, f'.{name}.{secrets.token_hex(4)}.tmp')


def _fsync_folder(folder):
    """Make a rename in ``folder`` durable (not possible on every OS)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` atomically; parent folders are created.

    Args:
        path (str | os.PathLike): The target file.
        data (bytes | bytearray | memoryview): The new content.

    Returns:
        str: ``path``.

    Raises:
        OSError: When the write fails (e.g. full disk); ``path`` is then
            unchanged and the temporary file removed. The error's
            ``filename`` is ``path``.
    """
    path = os.fspath(path)
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, 'xb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename in (None, tmp):
            # Name the file the caller asked for, not the temporary one
            # (a full disk otherwise reads as a bare "[Errno 28]").
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise
    _fsync_folder(folder)
    return path


def atomic_write_text(path, text, encoding='utf-8'):
    """Write the string ``text`` to ``path`` atomically (see above)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path, obj, **kwargs):
    """Dump ``obj`` as JSON to ``path`` atomically.

    The object is serialised before the file is touched, so an object that
    is not JSON-serialisable raises ``TypeError`` and leaves ``path`` as it
    was.

    Args:
        path (str | os.PathLike): The target file.
        obj: A JSON-serialisable object.
        **kwargs: Passed to :func:`json.dumps` (e.g. ``indent``).

    Returns:
        str: ``path``.
    """
    return atomic_write_text(path, json.dumps(obj, **kwargs))


def remove_stale_temp_files(folder, names=None):
    """Remove the temporary files that killed writers left in ``folder``.

    Only for a folder no other process is writing to at the time.

    Args:
        folder (str): The folder to clean.
        names (callable, optional): Called with a target's file name; only
            its temporary files are removed when it returns True. All by
            default.

    Returns:
        list[str]: The removed paths.
    """
    removed = []
    for path in glob.glob(osp.join(glob.escape(folder), '.*.tmp')):
        match = _TEMP_RE.match(osp.basename(path))
        if match and (names is None or names(match['name'])):
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed


@register_backend(ATOMIC_BACKEND)
class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose ``put``/``put_text`` are atomic.

    Select it with ``backend_args=dict(backend='atomnas_atomic_local')``.
    """

    def put(self, obj, filepath):
        atomic_write_bytes(filepath, obj)

    def put_text(self, obj, filepath, encoding='utf-8'):
        atomic_write_text(filepath, obj, encoding=encoding)
