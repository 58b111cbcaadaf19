"""Unsafe loading never happens: the source holds no pickle, no unguarded torch.load, no eval/exec, and never
enables trust_remote_code; expert names cannot escape their folder."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import expertzoo
from expertzoo import ZooError

SRC = Path(expertzoo.__file__).parent
FILES = sorted(SRC.rglob("*.py"))
PATTERNS = {
    "pickle": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", re.M),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\s*\("),
    "trust_remote_code enabled": re.compile(r"trust_remote_code\s*=\s*(?!False)"),
    "pickled weights format": re.compile(r"safe_serialization\s*=\s*False"),
}


def test_the_scan_sees_the_package():
    assert len(FILES) > 20 and any(f.name == "zoo.py" for f in FILES)


@pytest.mark.parametrize("what", sorted(PATTERNS))
def test_no_unsafe_loading(what):
    hits = [f"{f.relative_to(SRC)}:{text[:m.start()].count(chr(10)) + 1}"
            for f in FILES for text in [f.read_text(encoding="utf-8")] for m in PATTERNS[what].finditer(text)]
    assert not hits, f"{what} in {hits}"


def test_the_patterns_catch_what_they_must():
    samples = {"pickle": "import pickle\n", "torch.load without weights_only=True": "torch.load(path)\n",
               "eval/exec": "eval(text)\n", "trust_remote_code enabled": "f(trust_remote_code=True)\n",
               "pickled weights format": "m.save_pretrained(d, safe_serialization=False)\n"}
    assert all(PATTERNS[k].search(v) for k, v in samples.items())
    assert not PATTERNS["torch.load without weights_only=True"].search("torch.load(p, weights_only=True)")
    assert not PATTERNS["eval/exec"].search("model.eval()\n")


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", "..", "a\\b", "x\n"])
def test_expert_names_cannot_escape(name):
    with pytest.raises(ZooError, match=r"\[a-z0-9_-\]\+"):
        expertzoo.load_config({"base": "tiny:llama", "experts": [{"name": name, "kind": "lora"}]})
