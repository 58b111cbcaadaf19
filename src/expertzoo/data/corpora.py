"""More offline corpora for studies with many experts: source files of Debian and npm packages (C headers, Perl
modules, Emacs Lisp, TypeScript declarations, LaTeX sources) and two general-English sets not in man-page format
(WordNet glosses, the Python documentation's prose), each turned into plain text and split deterministically into
train and held-out jsonl files under the cache folder. `prepare(name)` also knows every name of `domains.prepare`.

A file (or, for WordNet, a synset) is held out when crc32 of its path relative to its root % 5 == 0, so no file is
split across the two parts; text is cut into chunks of at most CHUNK characters.
"""
from __future__ import annotations

import gzip
import html.parser
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import ZooError
from ..io.base_models import cache_dir
from . import domains

CHUNK = 2000
MAX_FILES = 1500  # files read per corpus at most: a spread (ordered by crc32 of the path), not one folder


def npm_root() -> Path:
    """Where `npm install --prefix <cache>/npm typescript` puts its packages."""
    return cache_dir() / "npm" / "node_modules"


# ---------------------------------------------------------------- text of one file

def strip_pod(source: str) -> str:
    """Perl source without its POD documentation blocks (from a line `=word` to the line `=cut`)."""
    out, in_pod = [], False
    for line in source.splitlines():
        if re.match(r"=[a-zA-Z]", line):
            in_pod = not line.startswith("=cut")
            continue
        if line.startswith("__END__"):
            break
        if not in_pod:
            out.append(line)
    return "\n".join(out).strip()


class _HtmlText(html.parser.HTMLParser):
    """Visible text of an HTML page: head, script, style, code blocks and navigation dropped; blocks become
    paragraphs."""

    SKIP = {"script", "style", "nav", "head", "footer", "pre"}  # pre: code examples, not prose
    BLOCK = {"p", "div", "pre", "li", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "tr", "br", "section", "table"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_tag, self.skip_depth = "", 0  # the element being skipped, and how deep inside it we are

    def handle_starttag(self, tag, attrs):
        if self.skip_depth:
            self.skip_depth += tag == self.skip_tag
        elif tag in self.SKIP or ("role", "navigation") in attrs:
            self.skip_tag, self.skip_depth = tag, 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if self.skip_depth:
            self.skip_depth -= tag == self.skip_tag
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip_depth:
            self.parts.append(data)


def html_text(source: str) -> str:
    """Plain text of an HTML page: tags, scripts and styles removed, entities resolved, blank runs collapsed."""
    parser = _HtmlText()
    parser.feed(source)
    text = "".join(parser.parts)
    text = re.sub(r"[ \t]+\n", "\n", re.sub(r"[ \t\r\f\v]+", " ", text))
    return re.sub(r"\n\s*\n(\s*\n)*", "\n\n", text).strip()


def wordnet_glosses(source: str) -> list[tuple[str, str]]:
    """(offset, gloss) of every synset line of a WordNet `data.*` file (license header lines start with spaces)."""
    out = []
    for line in source.splitlines():
        if not line[:1].isdigit() or " | " not in line:
            continue
        offset, gloss = line.split(" ", 1)[0], line.split(" | ", 1)[1].strip()
        if gloss:
            out.append((offset, gloss))
    return out


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


# ---------------------------------------------------------------- corpora of files

@dataclass(frozen=True)
class FileCorpus:
    """Files under `roots` whose names end in one of `suffixes`, each turned into text by `to_text`."""

    roots: tuple[str, ...]
    suffixes: tuple[str, ...]
    to_text: Callable[[str], str]
    how: str  # how to install the files, for the error when none are there
    min_chars: int = 200

    def files(self, roots: Iterable[Path] | None = None) -> list[tuple[Path, str]]:
        """(file, its path relative to its root) of every matching file, a spread of at most MAX_FILES."""
        found = []
        for root in [Path(r) for r in (roots or self.roots)]:
            dirs = sorted(Path(root.anchor).glob(str(root.relative_to(root.anchor)))) if "*" in str(root) else [root]
            for root_dir in dirs:
                if not root_dir.is_dir():
                    continue
                for p in sorted(root_dir.rglob("*")):
                    if p.is_file() and not p.is_symlink() and p.name.endswith(self.suffixes):
                        found.append((p, p.relative_to(root_dir).as_posix()))
        return sorted(found, key=lambda fr: (zlib.crc32(fr[1].encode()), fr[1]))[:MAX_FILES]


def held_out(key: str) -> bool:
    """A file (or record) goes to the held-out part when crc32(key) % 5 == 0 (about a fifth)."""
    return zlib.crc32(key.encode()) % 5 == 0


def chunks(text: str, size: int = CHUNK) -> list[str]:
    """`text` cut at line ends into pieces of at most `size` characters (a longer line is cut where it must). Unicode
    line separators become newlines: jsonl readers split lines on them."""
    text = re.sub("[\x85\u2028\u2029]", "\n", text)
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > size:
            if cur:
                out.append(cur)
                cur = ""
            out.append(line[:size])
            line = line[size:]
        if len(cur) + len(line) > size:
            out.append(cur)
            cur = ""
        cur += line
    if cur.strip():
        out.append(cur)
    return [c for c in out if c.strip()]


def prepare_files(corpus: FileCorpus, name: str, out: Path, roots: Iterable[Path] | None = None) -> tuple[Path, Path]:
    """Write NAME-train.jsonl and NAME-test.jsonl from the corpus's files (chunks of plain text)."""
    files = corpus.files(roots)
    if not files:
        raise ZooError(f"domain {name!r} found no files under {', '.join(map(str, roots or corpus.roots))}; "
                       f"install them: {corpus.how}")
    rows: dict[bool, list[dict]] = {False: [], True: []}
    for path, rel in files:
        text = corpus.to_text(read_text(path))
        if len(text) >= corpus.min_chars:
            rows[held_out(rel)] += [{"text": c} for c in chunks(text)]
    return domains._write_split(rows, name, out)


def prepare_wordnet(name: str, out: Path, roots: Iterable[Path] | None = None) -> tuple[Path, Path]:
    """WordNet glosses, 20 synsets a document in file order; a document is held out by crc32 of its first offset."""
    folders = [Path(r) for r in (roots or ("/usr/share/wordnet",))]
    files = [f for r in folders for f in sorted(r.glob("data.*")) if f.suffix in (".noun", ".verb", ".adj", ".adv")]
    if not files:
        raise ZooError(f"domain {name!r} found no WordNet data files; install them: apt-get install wordnet-base")
    rows: dict[bool, list[dict]] = {False: [], True: []}
    for f in files:
        glosses = wordnet_glosses(read_text(f))
        for i in range(0, len(glosses), 20):
            group = glosses[i:i + 20]
            text = "\n".join(g[0].upper() + g[1:] + ("" if g.endswith((".", "!", "?")) else ".") for _, g in group)
            rows[held_out(f"{f.name}:{group[0][0]}")].append({"text": text})
    return domains._write_split(rows, name, out)


CORPORA: dict[str, FileCorpus] = {
    "c-headers": FileCorpus(("/usr/include",), (".h",), lambda s: s.strip(),
                            "apt-get install linux-libc-dev libc6-dev"),
    "perl": FileCorpus(("/usr/share/perl/5.*",), (".pm",), strip_pod, "apt-get install perl-modules-5.36"),
    "elisp": FileCorpus(("/usr/share/emacs/*/lisp",), (".el.gz", ".el"), lambda s: s.strip(), "apt-get install emacs-el"),
    "typescript": FileCorpus((str(npm_root() / "typescript" / "lib"),), (".d.ts",), lambda s: s.strip(),
                             f"npm install --prefix {cache_dir() / 'npm'} typescript@5"),
    "latex": FileCorpus(("/usr/share/texlive/texmf-dist/tex/latex", "/usr/share/texlive/texmf-dist/source/latex"),
                        (".sty", ".cls", ".dtx", ".ltx"), lambda s: s.strip(), "apt-get install texlive-latex-base"),
    "python-doc": FileCorpus(tuple(f"/usr/share/doc/python3-doc/html/{part}" for part in
                                   ("tutorial", "howto", "faq", "whatsnew", "reference")),
                             (".html",), html_text, "apt-get install python3-doc", min_chars=500),
    "debian-reference": FileCorpus(("/usr/share/debian-reference",), (".en.html",), html_text,
                                   "apt-get install debian-reference-en", min_chars=500),
}
MAKERS: dict[str, Callable[[Path], tuple[Path, Path]]] = {
    **{n: (lambda out, n=n: prepare_files(CORPORA[n], n, out)) for n in CORPORA},
    "wordnet": lambda out: prepare_wordnet("wordnet", out),
}


def prepare(name: str, out: Path | None = None) -> tuple[Path, Path]:
    """(train, held-out) files of a domain, made once and cached: one of CORPORA, `wordnet`, or any name that
    `domains.prepare` knows (code, math, man:LANG, stdlib:PACKAGE, ...)."""
    if name not in MAKERS:
        try:
            return domains.prepare(name, out)
        except ZooError as err:
            if "unknown domain" in str(err):
                raise ZooError(f"{err}; or one of: {', '.join(MAKERS)}") from None
            raise
    out = out or cache_dir() / "data"
    train, test = out / f"{name}-train.jsonl", out / f"{name}-test.jsonl"
    if not (train.is_file() and test.is_file()):
        out.mkdir(parents=True, exist_ok=True)
        MAKERS[name](out)
    return train, test
