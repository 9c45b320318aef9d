"""Whether an output path can be written, checked before the work that produces it: by trying, since permission
bits say nothing for root, read-only mounts or /proc."""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def _can_create_in(folder: str) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def written_path(path: str) -> str:
    """The file that writing ``path`` replaces: a symbolic link is written through, as ``open`` writes it (the link
    is kept, the file it points to is written), also by the writers that write a temporary file and move it."""
    return os.path.realpath(path)


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes a temporary file beside the file ``path`` names (:func:`written_path`), which is then
    renamed over it: a crash mid-write never leaves a truncated file, and an exception (a full disk,
    KeyboardInterrupt) leaves no temporary file."""
    target = written_path(path)
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def output_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be written as a file (a phrase that follows the path), or None. A symbolic link is
    written through: the folder of the file it points to is the one checked."""
    folder = os.path.dirname(written_path(path))
    if os.path.isdir(path):
        return "is a folder; accepted: a file path"
    if not os.path.isdir(folder):
        return f"is in folder {folder!r}, which does not exist"
    if not _can_create_in(folder):
        return f"is in folder {folder!r}, which is not writable"
    return None


def output_folder_problem(path: str) -> str | None:
    """Why ``path`` cannot be used (or created) as a folder to write in (a phrase that follows the path), or None."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file; accepted: a folder (created if missing)"
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):  # the nearest ancestor there is: where the folder would be created
        parent = os.path.dirname(existing)
        if parent == existing:  # a root that is not there (a missing drive or network share)
            return f"cannot be created: {existing!r} does not exist"
        existing = parent
    if os.path.islink(existing) and not os.path.exists(existing):
        return f"cannot be created: {existing!r} is a broken symbolic link"
    if not os.path.isdir(existing):
        return f"cannot be created: {existing!r} is a file"
    if not _can_create_in(existing):
        return f"cannot be written: folder {existing!r} is not writable"
    return None
