"""`zoo inspect DIR --text TEXT | --data PATH --html OUT.html [--png OUT.png]`: the routing viewer."""
from __future__ import annotations

from ..errors import ZooError
from .common import console, named_paths, positive


def register(sub) -> None:
    p = sub.add_parser("inspect", help="HTML page of per-token routing (and a PNG heatmap of share per layer)")
    p.add_argument("dir", help="zoo folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text to route")
    src.add_argument("--data", metavar="NAME=PATH", help="a .txt or .jsonl data file (NAME=PATH or PATH): its first "
                     "document is routed")
    p.add_argument("--html", required=True, help="output HTML page")
    p.add_argument("--png", help="output PNG heatmap of expert share per layer")
    p.add_argument("--max-len", type=positive, default=512, help="tokens to route")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..build.load import load
    from ..data import read_documents
    from ..evaluation.viewer import routing_of, write_html, write_png

    if args.text is not None:
        text = args.text
    else:
        doc = read_documents(next(iter(named_paths([args.data]).values())))[0]
        text = doc.get("text") or doc["prompt"] + doc["completion"]
    if not text.strip():
        raise ZooError("--text is empty; give some text to route")
    zoo = load(args.dir)
    data = routing_of(zoo, text, args.max_len)
    write_html(data, args.html, title=f"routing of {args.dir}")
    if args.png:
        write_png(data, {s.name: s.layer for s in zoo.sites}, args.png)
    console.print(f"{len(data['tokens'])} tokens over {len(data['sites'])} sites -> {args.html}"
                  + (f", {args.png}" if args.png else ""))
    return 0
