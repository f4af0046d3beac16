"""Crash-safe file writes (temp file in the same folder, fsync, rename, fsync the folder) and the state folder's
lock (:class:`StateLock`: one process at a time changes it)."""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["atomic_write", "StateLock", "LOCK_FILE", "MAX_LOCK_WAIT", "storage_full", "is_full_error",
           "free_bytes"]

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_full_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full: an OSError's ENOSPC/EDQUOT, SQLite's
    SQLITE_FULL ("database or disk is full"), or a database driver's message naming ENOSPC."""
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code == 13  # SQLITE_FULL
    text = str(exc)
    return "database or disk is full" in text or "No space left on device" in text


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes this user may still write on the file system of ``folder`` (None when it cannot be read)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def storage_full(folder: str | os.PathLike, what: str, exc: BaseException | None = None):
    """The :class:`~edge_sdk.errors.StorageFullError` for ``what`` not written to ``folder``: it names the
    folder, the space left there and what to do."""
    from edge_sdk.errors import StorageFullError

    free = free_bytes(folder)
    left = "free space unknown" if free is None else f"{free / 1e6:.1f} MB free"
    return StorageFullError(
        f"the disk holding {folder} is full ({left}): {what} was not saved. Free some space on it (other files, "
        "old logs; a lower [privacy] max_predictions keeps the store smaller); fedser goes on once there is room"
        + (f" [{exc}]" if exc is not None else ""))


def atomic_write(path: str | os.PathLike, data: bytes | Iterable[bytes], *, mode: int = 0o644) -> int:
    """Replace ``path`` with ``data`` (bytes, or pieces of it written as they come) so a crash leaves the old file or
    the new one, never half. Returns the bytes written.

    The temporary file is created with ``mode`` from the start, so a private key is
    never readable by others, not even for an instant.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if is_full_error(exc):
            raise storage_full(path.parent, path.name, exc) from exc
        raise
    try:
        os.fchmod(fd, mode)
        written = 0
        with os.fdopen(fd, "wb") as fh:
            for piece in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
                written += fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if is_full_error(exc):
            raise storage_full(path.parent, path.name, exc) from exc
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return written


LOCK_FILE = "device.lock"
_HOLDER_MAX = 4096  # bytes read of the holder's note: it is a file on the device's disk, read within bounds
MAX_LOCK_WAIT = 86400.0  # seconds a caller may wait for the folder
_YEAR_2100 = 4102444800.0  # the note's start time is a Unix time before this (a Pi's clock may be far off)
_GRACE = 0.5  # seconds even wait=0 retries: StateLock.busy() (status, doctor) holds a shared lock for an instant


class StateLock:
    """One process at a time changes a device's state folder.

    ``listen``, ``train``, ``sync``, ``classify``, ``enroll`` and ``wipe-data`` each hold it for as long as they
    run: two of them at once would fit two personal heads over each other, post the same answers twice, or (a
    ``wipe-data`` beside a running ``listen``) leave the user's personal files in the memory of a process that
    writes them back. Reading (``status``, ``export-data``) and storing an answer (``feedback``, one SQLite
    transaction) need no lock.

    An advisory ``flock`` on ``<state>/device.lock``: the kernel releases it when its process ends however it
    ends, so a crash never leaves the folder locked. The holder writes its pid, command and start time into the
    file, for the error a second process gets (:class:`~edge_sdk.errors.StateBusyError`); that note is read at
    most 4 KB and checked field by field, and one that does not parse only makes the message vaguer. Library
    users who run their own loop on a :class:`~edge_sdk.device.Device` take the same lock::

        with StateLock(state_dir, command="my-app"):
            device = Device(state_dir)
            ...
    """

    def __init__(self, state_dir: str | os.PathLike, *, command: str = "fedser-edge") -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self.command = str(command)[:200]
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: float = 0.0) -> StateLock:
        """Take the folder, waiting up to ``wait`` seconds (at least half a second) for another holder; raises
        :class:`~edge_sdk.errors.StateBusyError` naming the holder when it does not."""
        import fcntl

        from edge_sdk.errors import FedserError, ParameterError, StateBusyError

        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_LOCK_WAIT:
            raise ParameterError(f"wait must be 0 to {MAX_LOCK_WAIT:.0f} seconds, got {wait!r}")
        if self._fd is not None:
            raise FedserError(f"{self.path} is already held by this lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as exc:
            if is_full_error(exc):
                raise storage_full(self.path.parent, f"the state folder's lock {LOCK_FILE}", exc) from exc
            raise FedserError(f"cannot open the state folder's lock {self.path}: {exc.strerror or exc}") from exc
        deadline = time.monotonic() + max(wait, _GRACE)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    holder = self.holder()
                    raise StateBusyError(_busy_message(self.path.parent, holder, wait), holder=holder) from None
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            except OSError as exc:
                os.close(fd)
                raise FedserError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
        note = json.dumps({"pid": os.getpid(), "command": self.command, "since": round(time.time(), 3)}).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, note, 0)
        except OSError:  # a full disk: the lock holds without its note (a second process's message is vaguer)
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no note outlives its holder
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def holder(self) -> dict | None:
        """The note of whoever holds (or last held) the folder: ``{"pid", "command", "since"}``, or None when
        there is none or it does not parse."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        try:
            raw = os.read(fd, _HOLDER_MAX + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        if not raw or len(raw) > _HOLDER_MAX:
            return None
        try:
            note = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(note, dict):
            return None
        pid, command, since = note.get("pid"), note.get("command"), note.get("since")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2 ** 31:
            return None
        if not isinstance(command, str) or not command.isprintable() or len(command) > 200:
            return None
        if isinstance(since, bool) or not isinstance(since, (int, float)) or not 0 <= since < _YEAR_2100:
            return None  # (NaN fails too)
        return {"pid": pid, "command": command, "since": float(since)}

    def busy(self) -> dict | None:
        """Whether another process holds the folder now: its note (``{}`` when it left none that parses), or
        None when the folder is free. Takes and drops the lock to find out, so it never blocks."""
        import fcntl

        if self._fd is not None:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return self.holder() or {}
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _busy_message(folder: Path, holder: dict | None, wait: float) -> str:
    who = "another process"
    if holder is not None:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["since"]))
        who = f"{holder['command']} (pid {holder['pid']}, since {since})"
    waited = f" after waiting {wait:g} s" if wait else ""
    return (f"the state folder {folder} is in use by {who}{waited}: one process at a time may change it. Stop that "
            "one first (the service: `sudo systemctl stop fedser-edge`; a terminal: Ctrl-C), or pass --wait SECONDS")
