"""Data files -> tokenized examples. `.txt`: blank-line-separated documents; `.jsonl`: `text`, or `prompt` +
`completion` (loss on the completion only). Long documents are cut into windows of `max_len` tokens."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import torch

from ..errors import ZooError

IGNORE = -100
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


def read_documents(path: str | Path) -> list[dict[str, str]]:
    """Documents of a data file as dicts with `text`, or `prompt` and `completion`."""
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"data file {str(path)!r} does not exist; give a .txt or .jsonl file")
    if path.suffix not in (".txt", ".jsonl"):
        raise ZooError(f"data file {str(path)!r} has suffix {path.suffix!r}; use .txt (blank-line-separated "
                       "documents) or .jsonl (`text`, or `prompt` + `completion`)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ZooError(f"data file {str(path)!r} is not UTF-8 (bad byte at line {line}); re-encode it as UTF-8") from None
    docs = _jsonl(text, path) if path.suffix == ".jsonl" else [{"text": d.strip()} for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise ZooError(f"data file {str(path)!r} holds no documents; add text to it")
    return docs


def _jsonl(text: str, path: Path) -> list[dict[str, str]]:
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ZooError(f"{str(path)!r} line {n} is not valid JSON; each line must be one JSON object") from None
        doc = _check_row(row, path, n)
        docs.append(doc)
    return docs


def _check_row(row: Any, path: Path, n: int) -> dict[str, str]:
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return {"text": row["text"]}
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return {"prompt": row["prompt"], "completion": row["completion"]}
    raise ZooError(f"{str(path)!r} line {n} lacks a string `text` (or `prompt` and `completion`); fix that line")


def tokenize(docs: list[dict[str, str]], tokenizer: Any, max_len: int = 256) -> list[Example]:
    """Examples of at most `max_len` tokens; text documents end with EOS and are cut into windows."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[Example] = []
    for doc in docs:
        if "text" in doc:
            ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"] + eos
            out += [Example(ids[i:i + max_len], ids[i:i + max_len]) for i in range(0, len(ids), max_len)
                    if len(ids[i:i + max_len]) > 1]
        else:
            prompt = tokenizer(doc["prompt"], add_special_tokens=False)["input_ids"]
            completion = (tokenizer(doc["completion"], add_special_tokens=False)["input_ids"] + eos)[:max_len - 1]
            prompt = prompt[-(max_len - len(completion)):]
            out.append(Example(prompt + completion, [IGNORE] * len(prompt) + completion))
    return out


def load_examples(path: str | Path, tokenizer: Any, max_len: int = 256, limit: int | None = None) -> list[Example]:
    """Examples of a data file; `limit` keeps that many, evenly spaced over the file (not just its start)."""
    docs = read_documents(path)
    if limit:
        docs = evenly(docs, limit)  # no more documents than examples wanted: tokenize only those
    return evenly(tokenize(docs, tokenizer, max_len), limit) if limit else tokenize(docs, tokenizer, max_len)


def evenly(items: Sequence[T], n: int) -> Sequence[T]:
    """At most `n` of `items` (a list, or a tensor along its first axis), evenly spaced, the first one included."""
    if len(items) <= n:
        return items
    if isinstance(items, torch.Tensor):
        return items[torch.arange(n) * len(items) // n]
    return [items[i * len(items) // n] for i in range(n)]


def pad_id(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels [B,S]."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def feed(model: Any, examples: list[Example], *, pad_id: int, batch_size: int, max_tokens: int) -> int:
    """Run `model` over `examples` batch by batch (on its device) until `max_tokens` real tokens have gone through;
    returns how many did. For collecting what forward hooks see."""
    device = next(model.parameters()).device
    seen = 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id)
        model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        seen += int(batch["attention_mask"].sum())
        if seen >= max_tokens:
            break
    return seen


def batches(examples: list[Example], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_id)


def endless_batches(examples: list[Example], batch_size: int, pad_id: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled epochs, forever, reproducibly from `seed`."""
    if not examples:
        raise ZooError("no training examples; the data file is empty or every document is shorter than 2 tokens")
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield collate([examples[j] for j in order[i:i + batch_size]], pad_id)
