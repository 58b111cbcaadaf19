"""Atomic writes: a folder or file is built under a temporary sibling name and renamed into place."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
