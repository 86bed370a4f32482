"""One writer per checkpoint directory: a lock file that a second writing process is refused by.

The lock is a POSIX record lock (`fcntl.lockf`) on `<directory>/.eqtrace-writer.lock`, taken by
a process's first `save_checkpoint` into the directory and held until the process exits. The
kernel drops it when the process ends, however it ends (`SIGKILL` included), so a lock is
never stale: the file left behind only names the last writer (pid, host, start time), for the
message a refused writer gets. On NFS the server drops it once the writer's host stops
renewing its lease. Readers (`latest_checkpoint`, `restore_checkpoint`) take no lock.
"""

import datetime
import errno
import fcntl
import os
import socket
import threading


#: The lock file's name inside a checkpoint directory (not a step: Orbax lists digits only).
LOCK_FILE = ".eqtrace-writer.lock"

#: Directory (real path) -> (pid, open descriptor) of the locks this process holds.
_held: dict[str, tuple[int, int]] = {}
#: Saves of one process into one directory run one at a time (threads share the lock above).
save_lock = threading.Lock()


class CheckpointLockedError(RuntimeError):
    """Another process is writing checkpoints into this directory."""


def hold_writer_lock(directory: str) -> None:
    """Takes the writer lock of `directory` for this process, if it does not hold it already;
    `CheckpointLockedError` if another live process holds it."""
    key = os.path.realpath(directory)
    held = _held.get(key)
    # A process forked from the holder does not inherit a POSIX lock: it must take its own.
    if held is not None and held[0] == os.getpid():
        return
    path = os.path.join(key, LOCK_FILE)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        if error.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise CheckpointLockedError(
            f"save_checkpoint: `directory` {directory!r} is being written by another process "
            f"({_holder(path)}): one writer per directory, so that neither deletes the other's "
            "checkpoints. Stop that process, or give this run its own directory; to evaluate "
            "while it trains, only read (`latest_checkpoint`, `restore_checkpoint` need no "
            "lock)."
        ) from None
    label = (
        f"pid {os.getpid()} on host {socket.gethostname()}, writing since "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n"
    )
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, label.encode(), 0)
    _held[key] = (os.getpid(), descriptor)


def _holder(path: str) -> str:
    # Read through a new descriptor: this process holds no lock on the file (it was refused),
    # so closing it releases nothing.
    try:
        with open(path) as file:
            return file.read().strip() or "unnamed"
    except OSError:
        return "unnamed"
