"""Files that a kill, a crash or a second run cannot leave half-written or silently replaced.

- ``atomic_write``: write to a temporary file in the same folder, fsync, then ``os.replace``;
  a kill at any point leaves either the old file or the new one, never a truncated mix.
- ``file_digest``: what a result depends on (a checkpoint's bytes), as a short hash.
- ``WorkDirLock``: one live run per work dir; a lock file holding the owner's pid and host.

Standard library only: the tools and the OpenMMLab layer use it, ``daft_mm.core`` does not.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import os.path as osp
import socket
import tempfile
import time
from typing import IO, Any, Callable, Iterator, Optional

__all__ = ['atomic_write', 'atomic_write_json', 'atomic_save', 'file_digest', 'same_file',
           'WorkDirLock', 'WorkDirBusyError']


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w') -> Iterator[IO[Any]]:
    """``with atomic_write(path) as f: ...``: ``path`` appears with its full content or not at
    all (an exception inside the block, or a kill, leaves the previous file untouched)."""
    if mode not in ('w', 'wb'):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj: Any, **dump_kwargs: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, **dump_kwargs)


def atomic_save(save: Callable[[IO[bytes]], None], path: str) -> None:
    """``atomic_save(lambda f: torch.save(obj, f), path)``: a binary file written atomically."""
    with atomic_write(path, 'wb') as f:
        save(f)


def file_digest(path: str, length: int = 16) -> str:
    """The first ``length`` hex digits of the file's SHA-256 (what a result computed from it
    depends on; names and modification times do not count)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()[:length]


def same_file(a: str, b: str) -> bool:
    """True when both paths name one file (links and relative paths included)."""
    try:
        return osp.samefile(a, b)
    except OSError:
        return osp.realpath(a) == osp.realpath(b)


class WorkDirBusyError(RuntimeError):
    """Another live process holds the work dir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM  # exists, owned by someone else
    return True


class WorkDirLock:
    """``<work_dir>/.daft_mm.lock``, holding the pid and host of the run that owns the folder.

    Why: mmengine names its log folder by the start second and saves ``iter_N.pth`` by iteration,
    so two runs in one work dir interleave logs and overwrite each other's checkpoints without a
    word. A lock left by a dead process (a kill, a crash) on this host is taken over; one from
    another host cannot be checked and is refused, naming the file to delete.
    """

    NAME = '.daft_mm.lock'

    def __init__(self, work_dir: str, what: str = 'run') -> None:
        self.work_dir = work_dir
        self.path = osp.join(work_dir, self.NAME)
        self.what = what
        self.taken_over: Optional[dict] = None
        self._held = False

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def acquire(self) -> 'WorkDirLock':
        os.makedirs(self.work_dir, exist_ok=True)
        me = {'pid': os.getpid(), 'host': socket.gethostname(), 'what': self.what,
              'started': time.strftime('%Y-%m-%d %H:%M:%S')}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner is None:
                    # half-written by a process that was just starting, or garbage: look again
                    time.sleep(0.2)
                    owner = self._read()
                if owner is not None and not self._stale(owner):
                    raise WorkDirBusyError(
                        f'work dir {self.work_dir!r} is in use by another '
                        f'{owner.get("what", "run")} (pid {owner.get("pid")} on '
                        f'{owner.get("host")}, started {owner.get("started")}): two runs in one '
                        'work dir would mix their logs and overwrite each other\'s checkpoints. '
                        'Fix: wait for it to finish, or '
                        'pass another --work-dir. If no such process exists (e.g. it ran on '
                        f'another machine and was killed), delete {self.path}')
                self.taken_over = owner
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            with os.fdopen(fd, 'w') as f:
                json.dump(me, f)
            self._held = True
            return self
        raise WorkDirBusyError(f'could not take the lock {self.path}: other processes keep '
                               'creating it; is another run starting in the same work dir?')

    @staticmethod
    def _stale(owner: dict) -> bool:
        pid = owner.get('pid')
        if owner.get('host') != socket.gethostname() or not isinstance(pid, int):
            return False
        return pid != os.getpid() and not _pid_alive(pid)

    def release(self) -> None:
        if not self._held:
            return
        owner = self._read()
        if owner is not None and owner.get('pid') == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._held = False

    def __enter__(self) -> 'WorkDirLock':
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
