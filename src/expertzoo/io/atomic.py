"""Atomic writes: a folder or file is built under a temporary sibling name and renamed into place, with the modes
a plain write would give under the user's umask (temporary files and safetensors are created private, 0600)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_up(root: Path) -> None:
    """Give `root`, and everything under it, the modes of a plain mkdir / open under the umask."""
    mask = umask()
    for path in (root, *root.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def recover(target: str | Path) -> None:
    """Put back the previous version of `target` if a swap was killed between its two renames."""
    target = Path(target)
    if not target.exists():
        for old in sorted(target.parent.glob(f".{target.name}.old-*")):
            os.replace(old, target)
            return


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, may_replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `target` by renames only, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        open_up(tmp)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            if not may_replace:
                raise FileExistsError(target)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
