"""Result files written whole or not at all, and read back with a one-line error when damaged.

Every file lrdist produces (results, summaries, studies' metadata, reports, plots, checkpoints) goes
through ``write_atomic``: the content goes to a temporary file with a unique name in the same folder, is
flushed to disk, and then replaces the target in one rename. A process killed at any moment (kill -9)
leaves the old file or the new one, never a truncated mix; two processes writing the same file never
share a temporary name. A kill can leave a temporary file behind (``.NAME.HOST-PID.*.tmp``); readers
ignore it, and the next write of NAME removes those whose writer (a process of this host) is gone.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable

_UMASK = os.umask(0)
os.umask(_UMASK)  # (read once: mkstemp makes files 0600, results should get the usual permissions)


def write_atomic(path, content: str | bytes | Callable) -> Path:
    """Write ``content`` (text, bytes, or a function that writes into a binary file object) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut once the folder is synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]  # (a folder may be shared by machines)


def alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path) -> int:
    """Remove the temporary files of ``path`` that a killed writer of this host left; returns how many.
    Those of live processes, of other hosts, and of unknown names are left alone."""
    path, removed = Path(path), 0
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.{_HOST}-*.tmp"):
        pid = tmp.name[len(path.name) + len(_HOST) + 3:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
    return removed


def glob_escape(name: str) -> str:
    import glob
    return glob.escape(name)


def append_line(path, line: str) -> Path:
    """Add one line to a text file (e.g. JSONL), the whole file rewritten atomically: a kill never leaves
    half a line."""
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    return write_atomic(path, old + line.rstrip("\n") + "\n")


def write_json(path, obj, indent: int | None = 2) -> Path:
    return write_atomic(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path, what: str = "", fix: str = "give the file lrdist wrote"):
    """A JSON file's contents; a missing or damaged file is one ``InputError`` line naming it and the fix."""
    from lrdist.preflight import InputError
    path = Path(path).expanduser()
    label = f"{what} {path}".strip()
    if not path.is_file():
        raise InputError(f"{label} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{label} is not valid JSON ({exc}); {fix}") from None
