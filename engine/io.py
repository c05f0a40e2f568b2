"""Atomic writes: a result or checkpoint file is either the old one or the complete new one.

Each writer writes to a temporary file in the destination's directory (same filesystem) and
renames it over the destination with `os.replace`, which is atomic on POSIX; a killed process
leaves at most a stray `*.tmp` file, never a truncated result.
"""
import contextlib
import csv
import io
import json
import os
import shutil
import tempfile


def _atomic(path, write, mode):
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary sibling directory of `path` to fill; on success it is renamed to `path` when that
    is absent or empty, else each of its entries replaces its namesake in `path` by a rename (a run
    folder keeps its args.json and metrics); on any error it is removed: no file is ever half-written."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
        if os.path.isdir(path) and os.listdir(path):
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
            os.rmdir(tmp)
            return
        if os.path.isdir(path):
            os.rmdir(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_save(obj, path):
    """`torch.save(obj, path)` through a temporary file and a rename."""
    import torch

    _atomic(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(path, text):
    _atomic(path, lambda f: f.write(text), "w")


def atomic_copy(src, path):
    """Copy the file `src` to `path` through a temporary file and a rename."""
    with open(src, "rb") as source:
        _atomic(path, lambda f: shutil.copyfileobj(source, f), "wb")


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_savefig(fig, path, dpi=110):
    """Save a matplotlib figure as PNG through a temporary file and a rename."""
    _atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi), "wb")


def atomic_write_csv(path, fields, rows):
    """A CSV with header `fields` from dict rows (extra keys ignored), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
