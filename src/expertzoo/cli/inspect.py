"""`zoo inspect DIR --text TEXT | --data PATH --html OUT.html [--png OUT.png]`: the routing viewer."""
from __future__ import annotations

from ..data import read_documents
from ..errors import ZooError
from ..evaluation.viewer import routing_of, write_html, write_png
from ..build.load import load
from .common import console


def register(sub) -> None:
    p = sub.add_parser("inspect", help="HTML page of per-token routing (and a PNG heatmap of share per layer)")
    p.add_argument("dir", help="zoo folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text to route")
    src.add_argument("--data", help="a .txt or .jsonl data file: its first document is routed")
    p.add_argument("--html", required=True, help="output HTML page")
    p.add_argument("--png", help="output PNG heatmap of expert share per layer")
    p.add_argument("--max-len", type=int, default=512, help="tokens to route (default 512)")
    p.set_defaults(run=run)


def run(args) -> int:
    zoo = load(args.dir)
    if args.text is not None:
        text = args.text
    else:
        doc = read_documents(args.data)[0]
        text = doc.get("text") or doc["prompt"] + doc["completion"]
    if not text:
        raise ZooError("--text is empty; give some text to route")
    data = routing_of(zoo, text, args.max_len)
    write_html(data, args.html, title=f"routing of {args.dir}")
    if args.png:
        write_png(data, {s.name: s.layer for s in zoo.sites}, args.png)
    console.print(f"{len(data['tokens'])} tokens over {len(data['sites'])} sites -> {args.html}"
                  + (f", {args.png}" if args.png else ""))
    return 0
