"""Files that a kill, a crash or a second run cannot leave half-written or silently replaced.

- ``atomic_write``: write to a temporary file in the same folder, fsync, then ``os.replace``;
  a kill at any point leaves either the old file or the new one, never a truncated mix.
- ``file_digest``: what a result depends on (a checkpoint's bytes), as a short hash.
- ``WorkDirLock``: one live run per work dir; a lock file holding the owner's pid and host,
  kept fresh by a heartbeat so that a lock left by a killed run is recognised anywhere.

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
import threading
import time
from typing import IO, Any, Callable, Iterator, Optional

__all__ = ['atomic_write', 'atomic_write_json', 'atomic_save', 'file_digest', 'same_file',
           'WorkDirLock', 'WorkDirBusyError']


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        # mkstemp creates 0600; the file gets the mode open() would give it (0666 less the
        # user's umask), so teammates can read results as they can any other file of the user's
        os.chmod(tmp, 0o666 & ~_umask())
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


def _process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``), or None where
    that cannot be read: a pid alive with another start time is another process that reused
    the number."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(')') + 2:].split()  # the name in parentheses may hold spaces
    return fields[19] if len(fields) > 19 else None


class WorkDirLock:
    """``<work_dir>/.daft_mm.lock``, holding the pid and host of the run that owns the folder.

    Why: mmengine names its log folder by the start second and saves ``iter_N.pth`` by iteration,
    so two runs in one work dir interleave logs and overwrite each other's checkpoints without a
    word. While held, a thread touches the file every ``HEARTBEAT`` seconds. On the same host the
    owner's process is checked itself: the lock is stale, and taken over with a note that says
    what was checked, when that pid no longer runs or now belongs to another process (another
    start time); a live owner keeps it however old its heartbeat (a run stopped with Ctrl-Z /
    SIGSTOP beats no more, but will go on when continued). From another host only the heartbeat
    can be seen: stale after ``STALE_AFTER`` seconds without one (a run killed on another node,
    a Slurm requeue).
    A file that holds no readable owner is reported, not taken over; ``force=True``
    (``tools/train.py --break-lock``) removes any lock.
    """

    NAME = '.daft_mm.lock'
    HEARTBEAT = 30.0
    STALE_AFTER = 300.0

    def __init__(self, work_dir: str, what: str = 'run') -> None:
        self.work_dir = work_dir
        self.path = osp.join(work_dir, self.NAME)
        self.what = what
        self.taken_over: Optional[dict] = None
        self.taken_over_because = ''  # what was checked to find the owner gone
        self.broken: Optional[str] = None  # what --break-lock removed
        self._held = False
        self._stop: Optional[threading.Event] = None

    def _read(self) -> tuple[Optional[dict], str]:
        """(owner, raw text); owner is None when the file is unreadable or not an owner record."""
        try:
            with open(self.path, errors='replace') as f:
                text = f.read()
        except OSError:
            return None, ''
        try:
            owner = json.loads(text)
        except ValueError:
            return None, text
        return (owner if isinstance(owner, dict) and 'pid' in owner else None), text

    def _age(self) -> float:
        """Seconds since the owner's last heartbeat (the file's modification time)."""
        try:
            return time.time() - os.stat(self.path).st_mtime
        except OSError:
            return 0.0

    def acquire(self, force: bool = False) -> 'WorkDirLock':
        os.makedirs(self.work_dir, exist_ok=True)
        me = {'pid': os.getpid(), 'host': socket.gethostname(), 'what': self.what,
              'started': time.strftime('%Y-%m-%d %H:%M:%S'),
              'process_start': _process_start(os.getpid())}
        if force and osp.exists(self.path):
            self.broken = self._read()[1][:200]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner, text = self._read()
                if owner is None:
                    time.sleep(0.5)  # a process that is just writing its record: look again
                    owner, text = self._read()
                if owner is None and osp.exists(self.path):
                    raise WorkDirBusyError(
                        f'the lock file {self.path} holds no readable owner ({text[:80]!r}): it '
                        'cannot tell whether a run still uses this work dir. Fix: if none does, '
                        'run again with --break-lock (tools/train.py) or delete the file')
                because = self._stale(owner, self._age()) if owner is not None else ''
                if owner is not None and not because:
                    raise WorkDirBusyError(
                        f'work dir {self.work_dir!r} is in use by another '
                        f'{owner.get("what", "run")} (pid {owner.get("pid")} on '
                        f'{owner.get("host")}, started {owner.get("started")}, last heartbeat '
                        f'{self._age():.0f}s ago): two runs in one work dir would mix their logs '
                        'and overwrite each other\'s checkpoints. Fix: wait for it to finish, or '
                        'pass another --work-dir. A lock whose heartbeat stopped more than '
                        f'{self.STALE_AFTER:.0f}s ago (on another host), or whose process no '
                        'longer runs (this host), is taken over by itself; if you know the run '
                        'is gone, --break-lock (tools/train.py) removes it now')
                self.taken_over, self.taken_over_because = owner, because
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            with os.fdopen(fd, 'w') as f:
                json.dump(me, f)
            self._held = True
            self._start_heartbeat()
            return self
        raise WorkDirBusyError(f'could not take the lock {self.path}: other processes keep '
                               'creating it; is another run starting in the same work dir?')

    def _start_heartbeat(self) -> None:
        stop = self._stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.HEARTBEAT):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        threading.Thread(target=beat, name='daft-mm-lock-heartbeat', daemon=True).start()

    @classmethod
    def _stale(cls, owner: dict, age: float) -> str:
        """Why the owner is gone ('' while it may still run), from what can be checked: its
        process on this host, its heartbeat from another."""
        pid = owner.get('pid')
        if owner.get('host') == socket.gethostname() and isinstance(pid, int):
            if pid == os.getpid():
                return ''
            if not _pid_alive(pid):
                return f'its process (pid {pid}) no longer runs on this host'
            recorded, now = owner.get('process_start'), _process_start(pid)
            if recorded and now and recorded != now:
                return (f'pid {pid} now belongs to another process (started at another time '
                        'than the owner)')
            if recorded and now:
                return ''  # the owner itself, alive (perhaps stopped): its lock stands
            if age > cls.STALE_AFTER:  # a lock from before start times were recorded
                return (f'its heartbeat stopped {age:.0f}s ago; pid {pid} runs, but the lock '
                        'records no start time to tell whether it is the owner')
            return ''
        if age > cls.STALE_AFTER:
            return (f'its heartbeat stopped {age:.0f}s ago (more than {cls.STALE_AFTER:.0f}s; '
                    f'owner on {owner.get("host")}, whose processes this host cannot see)')
        return ''

    def release(self) -> None:
        if not self._held:
            return
        if self._stop is not None:
            self._stop.set()
        owner = self._read()[0]
        if owner is not None and owner.get('pid') == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._held = False

    def __enter__(self) -> 'WorkDirLock':
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
