"""`zoo train-router`: trains the router alone (or with the embeddings, saved with the zoo), with checkpoints that
--resume continues exactly; bad input exits 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import expertzoo as ez
from expertzoo.cli import main
from helpers import fresh, perturb


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("train_router")
    model, tok = fresh()
    zoo = ez.build({"base": "tiny:llama", "experts": [{"name": "a", "kind": "lora", "rank": 2},
                                                      {"name": "b", "kind": "lora", "rank": 2}],
                    "router": {"kind": "learned", "top_k": 1, "jitter": 0.1}}, model=model, tokenizer=tok)
    perturb(zoo, router_scale=0.02)
    zoo.save(root / "zoo")
    files = []
    for name, ch in (("a", "q"), ("b", "7")):
        (root / f"{name}.txt").write_text("\n\n".join((ch * (3 + i % 4) + " ") * 8 for i in range(8)), encoding="utf-8")
        files.append(str(root / f"{name}.txt"))
    return root / "zoo", files


def _train(setup, out: Path, *extra: str, zoo_dir: Path | None = None) -> int:
    files = setup[1]
    return main(["train-router", str(zoo_dir or setup[0]), "--data", *files, "--quiet", "--batch-size", "2", "--max-len", "32",
                 "-o", str(out), *extra])


def test_router_alone_changes(setup, tmp_path):
    assert _train(setup, tmp_path / "out", "--steps", "3", "--balance-weight", "0.1", "--z-weight", "0.01") == 0
    before, after = ez.load(setup[0]), ez.load(tmp_path / "out")
    assert any(not torch.equal(a, b) for a, b in zip(before.router_parameters(), after.router_parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before.expert_parameters(), after.expert_parameters()))
    assert torch.equal(after.model.model.embed_tokens.weight, fresh()[0].model.embed_tokens.weight)
    assert "base_params" not in json.loads((tmp_path / "out" / "zoo.json").read_text())


def test_train_embeddings_are_saved_with_the_zoo(setup, tmp_path):
    assert _train(setup, tmp_path / "out", "--steps", "3", "--train-embeddings", "--lr", "0.05") == 0
    meta = json.loads((tmp_path / "out" / "zoo.json").read_text())
    assert meta["base_params"] == ["model.embed_tokens.weight"]
    loaded = ez.load(tmp_path / "out")  # the base is rebuilt from tiny:llama, the trained embeddings from the zoo
    assert not torch.equal(loaded.model.model.embed_tokens.weight, fresh()[0].model.embed_tokens.weight)


def test_resume_continues_exactly(setup, tmp_path):
    """2 steps + checkpoint, then --resume to 4 steps == 4 steps at once."""
    ckpt = str(tmp_path / "ckpt")
    assert _train(setup, tmp_path / "full", "--steps", "4") == 0
    assert _train(setup, tmp_path / "half", "--steps", "2", "--checkpoint-every", "2", "--checkpoint-dir", ckpt) == 0
    assert any((tmp_path / "ckpt").iterdir())  # a checkpoint was written
    other = ez.load(setup[0])  # different starting router weights: only a real resume can end where `full` did
    with torch.no_grad():
        for p in other.router_parameters():
            p.normal_(0.0, 0.02)
    other.save(tmp_path / "other")
    assert _train(setup, tmp_path / "resumed", "--steps", "4", "--checkpoint-dir", ckpt, "--resume",
                  zoo_dir=tmp_path / "other") == 0
    full, resumed = ez.load(tmp_path / "full"), ez.load(tmp_path / "resumed")
    for a, b in zip(full.router_parameters(), resumed.router_parameters()):
        assert torch.equal(a, b)


def test_bad_data_exits_2(setup, tmp_path, capsys):
    assert main(["train-router", str(setup[0]), "--data", str(tmp_path / "nope.txt"), "--steps", "1",
                 "-o", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
