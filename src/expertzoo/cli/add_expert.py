"""`zoo add-expert DIR --from SOURCE [--name N] [--kind K] [--sites ...] [--layers L] -o OUT`: add one expert to a
saved zoo, at its own sites (an expert folder's, unless --sites / --layers say otherwise), and save the new zoo
atomically. A data-built router then fits it with `zoo fit-router OUT --add --data N=PATH`."""
from __future__ import annotations

from pathlib import Path

from ..errors import ZooError
from .common import add_output, check_output, console, plural


def register(sub) -> None:
    p = sub.add_parser("add-expert", help="add an expert (an expert folder, PEFT adapter or checkpoint) to a zoo")
    p.add_argument("dir", help="zoo folder")
    p.add_argument("--from", dest="source", required=True,
                   help="expert folder (from `zoo train-expert`), PEFT adapter folder or fine-tuned checkpoint")
    p.add_argument("--name", help="the expert's name in the zoo (default: the name the expert folder recorded, "
                                  "else the folder's name)")
    p.add_argument("--kind", help="expert kind (default: the one the expert folder recorded; required otherwise)")
    p.add_argument("--sites", nargs="+", action="extend", metavar="SITE", help="sites of the expert (default: the expert folder's, "
                                                               "else the zoo's)")
    p.add_argument("--layers", help="layers of the expert: all, '24-29', '0,3' (default: the expert folder's, "
                                    "else the zoo's)")
    add_output(p)
    p.set_defaults(run=run)


def source_spec(args) -> dict:
    """The expert's spec from the flags and, for an expert folder, what the folder recorded."""
    from ..config import check_name, parse_config
    from ..io.expert_folder import is_expert_folder, read_expert_meta

    if not Path(args.source).exists():
        raise ZooError(f"--from {args.source!r} does not exist; give an expert folder, PEFT adapter or checkpoint")
    meta = read_expert_meta(args.source) if is_expert_folder(args.source) else {}
    kind = args.kind or meta.get("kind")
    if kind is None:
        raise ZooError(f"--from {args.source!r} is not an expert folder, so its kind is unknown; pass --kind "
                       "(lora for a PEFT adapter, ffn for a fine-tuned checkpoint)")
    name = args.name or meta.get("name") or Path(args.source).resolve().name
    try:
        check_name(name)
    except ValueError as err:
        raise ZooError(f"--name: {err}") from None
    spec = {"name": name, "kind": kind, "from": str(args.source)}
    spec.update({k: v for k, v in (("sites", args.sites), ("layers", args.layers)) if v is not None})
    return parse_config({"experts": [spec]}).experts[0].to_dict()  # a bad kind, site or layers: one line


def run(args) -> int:
    from ..build.load import load

    spec = source_spec(args)  # bad flags are refused before the zoo is loaded
    check_output(args.out, force=args.force)
    zoo = load(args.dir)
    zoo.add_expert(spec)
    zoo.save(args.out)
    here = zoo.placement()[spec["name"]]
    console.print(f"added {spec['kind']} expert {spec['name']!r} at {plural(len(here), 'site')} "
                  f"({here[0]} .. {here[-1]}); the zoo has {plural(len(zoo.expert_names), 'expert')} -> {args.out}")
    return 0
