"""Shared file-system helpers: the cache root, atomic file writes and folder replacement.

Standard library only, so the backend set-up can use it before mlx.core is imported.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """``$MLX_SPECSTREAM_HOME`` or ``~/.cache/mlx-specstream``: the root of every cache."""
    home = os.environ.get("MLX_SPECSTREAM_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "mlx-specstream"


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Write ``path`` through ``write(tmp)`` into a hidden file beside it, then rename it into
    place: readers see the old file or the complete new one.  The temporary file keeps the
    suffix of ``path`` (writers such as ``mx.save_safetensors`` add a missing one) and is
    removed when ``write`` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def make_temp_dir(dst: Path) -> Path:
    """A new empty folder ``.<dst name>.tmp-XXXXXXXX`` next to ``dst`` (umask permissions)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = dst.parent / f".{dst.name}.tmp-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary folder next to {dst}")


def move_into_place(tmp: Path, dst: Path, *, force: bool) -> None:
    """Rename the complete ``tmp`` folder to ``dst``; with ``force``, replace ``dst`` only now."""
    if dst.exists() or dst.is_symlink():
        if not force:
            raise FileExistsError(f"{dst} already exists; pass --force (force=True) to replace it")
        old = dst.parent / f".{dst.name}.old-{secrets.token_hex(4)}"
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
        return
    try:
        os.rename(tmp, dst)
    except OSError as e:  # dst appeared meanwhile (another process) as a non-empty folder
        if dst.exists():
            raise FileExistsError(
                f"{dst} already exists; pass --force (force=True) to replace it"
            ) from e
        raise
