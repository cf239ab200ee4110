"""Crash-safe writes of the files a run leaves (config.toml, eval.json, predictions.json, results
tables and figures rewritten after every profiled cell, ...): a reader, another rank or a resumed run
sees the old file or the new one, never half of one (a time-boxed GPU run's SIGTERM included)."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from pathlib import Path

from esskit.errors import ConfigError

_UMASK = os.umask(0o022)  # read once, at import (os.umask can only read by setting)
os.umask(_UMASK)


def new_file_mode() -> int:
    """What open() would give a new file: mkstemp's 0600 would make run files private."""
    return 0o666 & ~_UMASK


@contextlib.contextmanager
def _replaced_atomically(path: Path):
    """A temporary file beside `path` (an open fd and its name) that replaces `path` when the block
    ends, or is removed when it raises."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, flush it to disk, and rename it into place."""
    with _replaced_atomically(Path(path)) as (fd, _):
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_csv_atomic(path: str | Path, columns, rows: list[dict]) -> None:
    """`rows` as CSV with a header of `columns` (keys outside them are left out), written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue())


def save_figure_atomic(fig, path: str | Path, **savefig_kwargs) -> None:
    """matplotlib's `fig.savefig` to a temporary file beside `path`, renamed into place."""
    path = Path(path)
    with _replaced_atomically(path) as (fd, tmp):
        os.close(fd)
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None, **savefig_kwargs)


def make_out_dir(out: Path) -> None:
    """Create the `--out` folder of a command, or say in one line why it cannot be."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out} cannot be created: {e.strerror}") from None
