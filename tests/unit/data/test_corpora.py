"""Offline corpora from tiny fake package trees: each preparer gives plain text (markup stripped), a deterministic
train/held-out split by file with no file on both sides, and a clear error when its files are not installed."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from expertzoo.data import corpora
from expertzoo.data.corpora import (CORPORA, chunks, held_out, html_text, prepare, prepare_files, prepare_wordnet,
                                    strip_pod, wordnet_glosses)
from expertzoo.errors import ZooError


def rows(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def fake_tree(root: Path, suffix: str, body: str, n: int = 30, gz: bool = False) -> Path:
    """`n` files root/pkgK/fileK<suffix> whose text is `body` with the file's number in it."""
    for k in range(n):
        path = root / f"pkg{k % 3}" / f"file{k}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = body.replace("{k}", str(k)) * 3
        path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return root


def test_strip_pod_keeps_the_code():
    src = "package Foo;\nuse strict;\n=head1 NAME\n\nFoo - a thing\n\n=cut\nsub bar { 1 }\n__END__\ntrailing\n"
    assert strip_pod(src) == "package Foo;\nuse strict;\nsub bar { 1 }"


def test_html_text_drops_markup_code_and_navigation():
    page = ("<html><head><title>T</title><style>p{}</style></head><body><div role='navigation'><a>next</a>"
            "<div>inner</div></div><h1>Lists&para;</h1><p>A list &amp; a <b>tuple</b>.</p>"
            "<div class='highlight'><pre>x = [1, 2]</pre></div><p>More  prose\there.</p><script>var a;</script></body></html>")
    assert html_text(page) == "Lists¶\n\nA list & a tuple.\n\nMore prose here."


def test_wordnet_glosses_skip_the_license_header():
    src = ("  1 This software and database is being provided\n"
           "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to exist  \n"
           "00001930 03 n 01 physical_entity 0 | an entity that has physical existence\n")
    assert wordnet_glosses(src) == [("00001740", "that which is perceived to exist"),
                                    ("00001930", "an entity that has physical existence")]


def test_chunks_respect_the_size_and_turn_unicode_separators_into_newlines():
    text = "line one\u2028still\n" + "x" * 50 + "\n" + "short\n" * 10
    out = chunks(text, size=20)
    assert all(len(c) <= 20 for c in out)
    assert "".join(out).replace("\n", "") == text.replace("\u2028", "").replace("\n", "")
    assert not any("\u2028" in c for c in out)


@pytest.mark.parametrize("name,suffix,body,gz,marker", [
    ("c-headers", ".h", "#ifndef H{k}\n#define H{k} 1\nint f{k}(void);\n#endif\n" * 4, False, "#define"),
    ("perl", ".pm", "package P{k};\nsub f { return {k}; }\n=head1 DOC\n\nprose\n\n=cut\n1;\n" * 4, False, "sub f"),
    ("elisp", ".el.gz", ";;; f{k}.el\n(defun f{k} () (interactive) (message \"hi\"))\n" * 4, True, "(defun"),
    ("typescript", ".d.ts", "interface I{k} {\n  readonly x: number;\n}\ndeclare var v{k}: I{k};\n" * 4, False,
     "interface"),
    ("latex", ".sty", "\\NeedsTeXFormat{LaTeX2e}\n\\ProvidesPackage{p{k}}\n\\newcommand\\f{k}{x}\n" * 4, False,
     "\\newcommand"),
])
def test_file_corpus_split_is_deterministic_disjoint_and_plain(name, suffix, body, gz, marker, tmp_path):
    root = fake_tree(tmp_path / "src", suffix, body, gz=gz)
    train, test = prepare_files(CORPORA[name], name, tmp_path / "a", roots=[root])
    again = prepare_files(CORPORA[name], name, tmp_path / "b", roots=[root])
    assert train.read_bytes() == again[0].read_bytes() and test.read_bytes() == again[1].read_bytes()
    a, b = rows(train), rows(test)
    assert a and b and all(marker in t for t in a + b)
    assert not {t for t in a} & {t for t in b}
    assert "=head1" not in "".join(a + b)
    expected_held = {f"pkg{k % 3}/file{k}{suffix}" for k in range(30) if held_out(f"pkg{k % 3}/file{k}{suffix}")}
    assert len(b) == len(expected_held) and 0 < len(expected_held) < 30


def test_html_corpus_is_prose_only(tmp_path):
    root = fake_tree(tmp_path / "html", ".html", "<p>Prose number {k} about lists and loops, long enough "
                     "to be kept as text.</p><pre>print({k})</pre>" * 5, n=20)
    train, test = prepare_files(CORPORA["python-doc"], "python-doc", tmp_path / "out", roots=[root])
    text = "".join(rows(train) + rows(test))
    assert "Prose number" in text and "print(" not in text and "<p>" not in text


def test_wordnet_documents(tmp_path):
    folder = tmp_path / "wn"
    folder.mkdir()
    lines = [f"{i:08d} 03 n 01 thing{i} 0 | a gloss about thing {i}" for i in range(1000)]
    (folder / "data.noun").write_text("  1 license header\n" + "\n".join(lines) + "\n")
    train, test = prepare_wordnet("wordnet", tmp_path / "out", roots=[folder])
    a, b = rows(train), rows(test)
    assert len(a) + len(b) == 50 and a and b
    assert all(t.startswith("A gloss about thing") for t in a + b) and "license" not in "".join(a + b)


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(ZooError, match="apt-get install emacs-el"):
        prepare_files(CORPORA["elisp"], "elisp", tmp_path, roots=[tmp_path / "nowhere"])
    with pytest.raises(ZooError, match="wordnet-base"):
        prepare_wordnet("wordnet", tmp_path, roots=[tmp_path / "nowhere"])


def test_unknown_names_list_the_corpora(tmp_path):
    with pytest.raises(ZooError, match="typescript"):
        prepare("nope", tmp_path)


def test_prepare_caches_and_falls_through_to_the_known_domains(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(corpora.MAKERS, "wordnet", lambda out: calls.append(out) or
                        [(out / f"wordnet-{p}.jsonl").write_text('{"text": "x"}\n') for p in ("train", "test")])
    first = prepare("wordnet", tmp_path)
    assert prepare("wordnet", tmp_path) == first and len(calls) == 1
    train, test = prepare("stdlib:json", tmp_path)
    assert rows(train) and rows(test)
