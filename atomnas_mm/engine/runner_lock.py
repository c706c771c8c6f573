"""One training run per work_dir.

Two runs on one work_dir interleave their logs, make ``last_checkpoint``
jump between them and leave a ``searched_arch.json`` of one run beside the
checkpoints of the other. :class:`WorkDirLock` holds an exclusive
``flock`` on ``<work_dir>/.atomnas_train.lock`` for the life of the run; the
file names the holder (PID, host, start time, command line). The kernel
releases the lock when its process dies however it dies, so a lock left by
a killed run is stale by construction: the next run takes it over and logs
whose it was.
"""
import fcntl
import json
import os
import os.path as osp
import socket
import sys
import time

LOCK_NAME = '.atomnas_train.lock'


class WorkDirBusyError(RuntimeError):
    """Another live run holds the work_dir."""


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, TypeError, ValueError):
        return True
    return True


class WorkDirLock:
    """An exclusive lock on a work_dir (see the module docstring).

    Args:
        work_dir (str): The folder; created when missing.
    """

    def __init__(self, work_dir):
        self.work_dir = work_dir
        self.path = osp.join(work_dir, LOCK_NAME)
        self.fd = None
        self.previous = None  # the holder a stale lock named

    def _read(self, fd):
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536)
        try:
            return json.loads(data.decode()) if data.strip() else None
        except (ValueError, UnicodeDecodeError):
            return None

    def acquire(self):
        """Take the lock.

        Returns:
            dict | None: What a stale lock file said about its holder.

        Raises:
            WorkDirBusyError: A live run holds it (the message names it).
        """
        os.makedirs(self.work_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._read(fd)
                os.close(fd)
                raise WorkDirBusyError(self._busy_message(holder)) from None
            try:  # the file may have been removed by its last holder
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.previous = self._read(fd)
        info = dict(pid=os.getpid(), host=socket.gethostname(),
                    started=time.strftime('%Y-%m-%d %H:%M:%S'),
                    command=' '.join(sys.argv))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self.fd = fd
        return self.previous

    def _busy_message(self, holder):
        if holder:
            who = (f"PID {holder.get('pid')} on host {holder.get('host')}, "
                   f"started {holder.get('started')}: "
                   f"{holder.get('command')}")
            if holder.get('host') == socket.gethostname() and isinstance(
                    holder.get('pid'), int) and not _pid_alive(holder['pid']):
                # a child that shares the lock outlives it for a moment
                who += ('; that process has ended, but a process it started '
                        '(e.g. a dataloader worker) still holds the lock: '
                        'try again in a few seconds')
        else:
            who = 'a process that has not written its name yet'
        return (f'work_dir {self.work_dir} is in use by another training '
                f'run ({who}). Two runs on one work_dir mix their logs, '
                'checkpoints and searched_arch.json: wait for it to end or '
                'stop it, or give this run another --work-dir (lock file '
                f'{self.path}).')

    def stale_message(self):
        """A line about the stale lock taken over (None if there was none)."""
        p = self.previous
        if not p:
            return None
        alive = p.get('host') == socket.gethostname() and isinstance(
            p.get('pid'), int) and _pid_alive(p['pid'])
        state = 'still running but not holding it' if alive else \
            'no longer running'
        return (f'took over the stale lock {self.path} of PID {p.get("pid")} '
                f'on host {p.get("host")} (started {p.get("started")}; '
                f'{state})')

    def release(self):
        """Remove the lock file and release the lock."""
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
