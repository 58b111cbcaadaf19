"""Hugging Face Hub ids (`org/name` or `org/name@revision`) for `base:` and `from:`, resolved to a local snapshot
folder by huggingface_hub (its cache, HF_HUB_OFFLINE, revisions); only safetensors weights and text files are
fetched, never pickles."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import ZooError

HUB_ID_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(@(?P<revision>[\w./-]+))?$")
# weights as safetensors only; configs, tokenizers and chat templates as text (sentencepiece's .model is protobuf)
ALLOW = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model", "*.jinja"]


def is_hub_id(spec: str) -> bool:
    """`org/name` or `org/name@revision` that names no local file or folder."""
    return bool(HUB_ID_RE.fullmatch(spec)) and not Path(spec.split("@")[0]).exists() and not Path(spec).exists()


def split_hub_id(spec: str) -> tuple[str, str | None]:
    """('org/name', revision or None)."""
    m = HUB_ID_RE.fullmatch(spec)
    if m is None:
        raise ZooError(f"{spec!r} is not a Hub id; write it as org/name or org/name@revision")
    return m["repo"], m["revision"]


def hub_snapshot(spec: str) -> Path:
    """The local folder of a Hub repo at a revision (the cache's snapshot; downloaded unless HF_HUB_OFFLINE=1)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = split_hub_id(spec)
    try:
        path = snapshot_download(repo, revision=revision, allow_patterns=ALLOW)
    except LocalEntryNotFoundError:
        raise ZooError(f"{spec!r} is not in the Hugging Face cache and the Hub cannot be reached; run "
                       f"`hf download {repo}{f' --revision {revision}' if revision else ''}` where it can, "
                       "or give a local folder") from None
    except (HfHubHTTPError, ValueError, OSError) as err:
        raise ZooError(f"cannot fetch {spec!r} from the Hugging Face Hub ({str(err).splitlines()[0]}); check the "
                       "repo id and revision, or give a local folder") from None
    return Path(path)


def local_source(source: str) -> str:
    """An expert's `from:` as a local path: a Hub id becomes its snapshot folder; anything else is kept."""
    return str(hub_snapshot(source)) if is_hub_id(source) else source
