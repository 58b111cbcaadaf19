"""Real domains that can be had offline: stdlib packages, man-page languages and sections, split deterministically
into train and held-out files; bad names get a clear error."""
import json
from pathlib import Path

import pytest

from expertzoo.data.domains import MAN_ROOT, prepare, troff_text
from expertzoo.errors import ZooError


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_stdlib_package_split_is_deterministic_and_disjoint(tmp_path):
    train, test = prepare("stdlib:json", tmp_path / "a")
    again = prepare("stdlib:json", tmp_path / "b")
    assert train.read_bytes() == again[0].read_bytes() and test.read_bytes() == again[1].read_bytes()
    a, b = rows(train), rows(test)
    assert a and b and all(len(r["text"]) <= 2000 for r in a + b)
    assert not {r["text"] for r in a} & {r["text"] for r in b}
    assert any("import" in r["text"] or "def " in r["text"] for r in a)


@pytest.mark.skipif(not (MAN_ROOT / "man2").is_dir(), reason="English man pages (section 2) not installed")
def test_man_section_is_plain_text(tmp_path):
    train, test = prepare("man-section:2", tmp_path)
    text = " ".join(r["text"] for r in rows(train) + rows(test))
    assert len(rows(test)) > 0 and "\\fB" not in text and ".SH" not in text


def test_troff_markup_is_stripped():
    src = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.B bold words\n'
    assert troff_text(src) == "NAME\nls - list directory contents\nbold words"


@pytest.mark.parametrize("name", ["man:../etc", "stdlib:", "nope", "stdlib:os/path", "man-section:1;rm"])
def test_bad_domain_names_are_refused(name, tmp_path):
    with pytest.raises(ZooError, match="unknown domain"):
        prepare(name, tmp_path)
    assert not any(tmp_path.iterdir())


def test_missing_package_names_the_choices(tmp_path):
    with pytest.raises(ZooError, match="no stdlib package 'nosuchpkg'"):
        prepare("stdlib:nosuchpkg", tmp_path)
