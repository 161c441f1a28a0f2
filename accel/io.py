"""Writing result and state files so an interruption never leaves half a file.

Whole files are written atomically: to a temporary file in the same folder, flushed and fsynced,
then `os.replace`d over the target, so a reader sees the old file or the new one, never a torn
one. Journals that grow by one record at a time stay append-only JSONL (`append_jsonl`); a reader
(`read_jsonl`) skips a line an interruption cut short and says so, naming the file.

A results folder is claimed by the command that writes it (`claim_folder`), so `accel run` cannot
overwrite the files of an ablation or a training run of the same name.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

MARKER = ".accel-command"  # names the command that writes a results folder


def first_line(error: BaseException) -> str:
    """An error's message as one line: its first non-empty line, else the error's class name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once: os.umask can only be read by setting it


def _fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Writes `path` atomically: `write(temporary_path)` fills a file beside it, which then replaces it.

    Args:
        path: the file to (re)write; its folder must exist.
        write: writes the whole content to the temporary path it is given.

    Returns:
        The path written.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(handle, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are shared like any other file
    os.close(handle)
    try:
        write(Path(temporary))
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes bytes atomically."""
    return atomic_write(path, lambda temporary: temporary.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    """Writes text (UTF-8) atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: Any, **dumps_options: Any) -> Path:
    """Writes `json.dumps(value, **dumps_options)` atomically."""
    return write_text(path, json.dumps(value, **dumps_options))


def save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Saves tensors as a safetensors file atomically (contiguous CPU copies)."""
    from safetensors.torch import save_file

    plain = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    return atomic_write(path, lambda temporary: save_file(plain, str(temporary), metadata=metadata))


def save_figure(figure, path: str | Path, **savefig_options: Any) -> Path:
    """Saves a matplotlib figure atomically (the format from the path's suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda temporary: figure.savefig(temporary, format=fmt, **savefig_options))


def append_jsonl(path: str | Path, record: dict, **dumps_options: Any) -> None:
    """Appends one JSON record as a line, flushed and fsynced.

    A file whose last line was cut short (no final newline) gets the newline first, so the new
    record stays a line of its own and only the torn one is lost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, **dumps_options) + "\n"
    with open(path, "ab+") as handle:
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = "\n" + line
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL journal, in order; a line that is not a JSON object (cut short by an
    interruption) is skipped with a message on stderr naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            print(f"accel: skipped line {number} of {path}: not a whole JSON record (cut short by an "
                  "interruption?); it will be measured again", file=sys.stderr)
            continue
        records.append(record)
    return records


def read_json(path: str | Path) -> Any:
    """The JSON value of a file; None when it is absent, or unreadable (said on stderr, naming it)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        print(f"accel: {path} is not whole JSON ({error}); it will be written again", file=sys.stderr)
        return None


def claim_folder(folder: str | Path, command: str, *, mark: bool = True) -> Path:
    """Creates the results folder of `command` (e.g. "accel run"), refusing one another command wrote.

    Also checks that the folder is writable before any work is done. With `mark`, the folder is
    marked as `command`'s (a small MARKER file); without, it is only checked.

    Raises:
        ValueError: the folder belongs to another command.
        OSError: the folder cannot be created or written (the error names the path).
    """
    folder = Path(folder)
    marker = folder / MARKER
    if marker.is_file():
        owner = marker.read_text(encoding="utf-8").strip()
        if owner != command:
            raise FolderClaimedError(f"{folder} holds the results of `{owner}`; `{command}` will not overwrite "
                                     "them: choose another name (name=...) or output.dir")
    folder.mkdir(parents=True, exist_ok=True)
    if mark:
        write_text(marker, command + "\n")
    else:
        probe = folder / f".accel-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    return folder


class FolderClaimedError(ValueError):
    """A results folder written by another command; its message is one line."""
