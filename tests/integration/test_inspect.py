"""The routing viewer: `zoo inspect` writes an HTML page and a PNG; in headless Chromium the page shows every
token coloured by its expert, and text like <script> stays inert."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from expertzoo.cli import main
from helpers import make_zoo

HOSTILE = "ok <script>document.title='pwned';document.body.dataset.pwned=1</script></script><img src=x onerror=alert(1)> &amp;"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def page(tmp_path: Path) -> tuple[Path, Path]:
    zoo = make_zoo(experts=[{"name": "a", "kind": "lora"}, {"name": "b", "kind": "mlp"}],
                   router_cfg={"kind": "learned", "top_k": 1, "null_experts": 1})
    zoo.save(tmp_path / "zoo")
    html, png = tmp_path / "r.html", tmp_path / "r.png"
    assert main(["inspect", str(tmp_path / "zoo"), "--text", HOSTILE, "--html", str(html), "--png", str(png)]) == 0
    return html, png


def test_page_and_png_are_written(page):
    html, png = page
    text = html.read_text()
    assert "<script>document.title" not in text  # the input never appears as markup
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_viewer_in_chromium_shows_tokens_and_runs_no_injected_code(page):
    if not CHROMIUM:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    html, _ = page
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={html.parent / 'profile'}", "--virtual-time-budget=2000", "--dump-dom",
                          html.as_uri()], capture_output=True, text=True, timeout=120).stdout
    spans = re.findall(r'<span data-expert="([a-z]+)"[^>]*title="([^"]*)"[^>]*>([^<]*)</span>', dom)
    assert len(spans) == len(HOSTILE.encode())  # the byte tokenizer: one token per byte
    assert {e for e, _, _ in spans} <= {"a", "b", "base"}
    assert all(re.match(r"a: \d\.\d{3}", title) for _, title, _ in spans)  # weights on hover
    shown = "".join(piece for _, _, piece in spans)
    assert "&lt;script&gt;document.title" in shown  # shown as text
    assert "<title>routing of" in dom and "pwned" not in dom.split("<body")[0]
    assert "data-pwned" not in dom and "<img" not in dom  # no injected element exists
    assert '<option value="all sites">' in dom and dom.count("<option") == 3  # all sites + 2 sites


def test_viewer_lists_each_sites_own_experts():
    from expertzoo.evaluation.viewer import render_html, routing_of
    from helpers import perturb

    zoo = make_zoo(experts=[{"name": "a", "kind": "lora", "rank": 4, "layers": [1]},
                            {"name": "b", "kind": "mlp", "hidden": 16}], router_cfg={"kind": "learned", "top_k": 1})
    perturb(zoo)
    data = routing_of(zoo, "hello world")
    assert data["site_experts"] == {"model.layers.0.mlp": ["b"], "model.layers.1.mlp": ["a", "b"]}
    assert all(row[0] == 0.0 for row in data["sites"]["model.layers.0.mlp"])  # `a` does not sit at layer 0
    assert '"site_experts"' in render_html(data)
