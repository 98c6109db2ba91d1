"""The paper's question at CPU scale (issue 19), pre-registered in benchmarks/SCIENCE.md §4.

Does a per-region LR distribution, searched on several task pairs and combined as the paper combines them,
score better than a flat LR tuned with the same budget, on task pairs that no search and no recipe choice
ever saw? Everything this script makes is a JSON file under ``benchmarks/science/paper_question/``
(trial files, tuning trials, held-out runs), so the study resumes on any machine from the repository:

    python benchmarks/paper_question.py run [--stage search|combine|tune|heldout|sensitivity|extra|all] [--commit]
    python benchmarks/paper_question.py report        # tables (report.md) and plots from the committed files

``run`` does what is missing, one unit at a time (a search or tuning trial, a held-out run), and with
``--commit`` commits each finished unit's files (``all`` runs every stage but ``extra``, the design's "if time
allows"). ``report`` reads only those files.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lrdist import stats  # noqa: E402
from lrdist.continual import RECIPES  # noqa: E402

ROOT = REPO / "benchmarks" / "science" / "paper_question"

# ---- the pre-registered design (SCIENCE.md §4); changing any of it makes a new study -----------------------
SEARCH_PAIRS = [["sst2", "qqp"], ["qnli", "sst2"], ["mnli", "sst2"]]
HELDOUT_PAIRS = [["qqp", "mnli"], ["sst2", "mnli"], ["mnli", "qnli"]]
TRIALS = 20                      # per searched pair; each baseline gets TRIALS trials over all 3 pairs
SEEDS = list(range(10))          # held-out: 3 pairs x 10 seeds = 30 paired runs per comparison
EXTRA_SEEDS = list(range(4))     # LLRD and LoRA, if time allows: fewer seeds, reported as such
RECIPE = replace(RECIPES["fast"], precision="bf16")  # §4.2: bf16 autocast measured not to move accuracies
PRIMARY = ("combined", "objective")
METHODS = ["combined", "top3", "ewc"]       # compared with tuned flat
METRICS = {"objective": "objective", "forgetting": "mean_forgetting",
           "task 1 final": None, "task 2": None}  # the last two read from the accuracy matrix
LEVEL = 0.95
FAMILY = len(METHODS) * len(METRICS) - 1    # the secondary comparisons: 11
PLANNED = len(HELDOUT_PAIRS) * len(SEEDS) * (1 + len(METHODS))  # held-out runs of flat and the methods: 120
BAR = 0.10                       # tuned flat learns a held-out pair's first task this far above its majority rate
MIN_UNITS = 30                   # the least number of paired runs in a comparison


def pair_name(pair) -> str:
    return "-".join(pair)


def default_model():
    from lrdist.cli import default_model as model
    return model()


def data_dir():
    from lrdist.cli import default_data_dir
    return str(REPO.parent / "shared" / "data" / "glue") if default_data_dir() is None else default_data_dir()


def commit(message: str, enabled: bool) -> None:
    if not enabled:
        return
    add = subprocess.run(["git", "add", str(ROOT)], cwd=REPO, capture_output=True, text=True)
    staged = add.returncode == 0 and subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=REPO).returncode
    done = staged and subprocess.run(["git", "commit", "-q", "-m", f"science: {message}"], cwd=REPO,
                                     capture_output=True, text=True)
    if add.returncode or (done and done.returncode):  # e.g. a lock held by another git: the next unit commits it
        print(f"paper_question: could not commit ({(add.stderr or done.stderr).strip()}); carrying on", flush=True)


# ---- stages -------------------------------------------------------------------------------------------------
def search_config(pair, trials: int):
    from lrdist.search import SearchConfig
    return SearchConfig(model=default_model(), tasks=pair, recipe=RECIPE, data_dir=data_dir(),
                        output=str(ROOT / "search" / pair_name(pair)), trials=trials, progress=False)


def finished(folder: Path) -> int:
    return len(list(folder.glob("trial-*.json")))


def run_searches(do_commit: bool) -> None:
    from lrdist.search import search
    for pair in SEARCH_PAIRS:
        folder = ROOT / "search" / pair_name(pair) / "trials"
        while (done := finished(folder)) < TRIALS:  # one trial per call: each finished trial is committed
            search(search_config(pair, done + 1))
            print(f"search {pair_name(pair)}: {finished(folder)} of {TRIALS} trials", flush=True)
            commit(f"search {pair_name(pair)}, trial {finished(folder)} of {TRIALS}", do_commit)


def combined_files() -> dict:
    return {"combined": ROOT / "combined.json", "top3": ROOT / "combined-sst2-qqp-top3.json"}


def run_combine(do_commit: bool) -> None:
    from lrdist.combine import combine_sources
    folders = [str(ROOT / "search" / pair_name(p)) for p in SEARCH_PAIRS]
    if any(finished(Path(f) / "trials") < TRIALS for f in folders):
        raise SystemExit("combine: the searches are not finished (run --stage search)")
    files = combined_files()
    combine_sources(folders, str(files["combined"]), top_k=1)   # the paper: each pair's best, geometric mean
    combine_sources(folders[:1], str(files["top3"]), top_k=3)   # the earlier variant: SST-2 -> QQP's top 3
    commit("combined distributions", do_commit)


def run_tuning(do_commit: bool) -> None:
    from lrdist.tune import tune_baselines
    for name in ("flat", "ewc"):
        folder = ROOT / "tune" / "trials" / f"tune-{name}"
        while (done := finished(folder)) < TRIALS:
            tune_baselines(default_model(), SEARCH_PAIRS, RECIPE, done + 1, str(ROOT / "tune"), methods=[name],
                           data_dir=data_dir(), progress=False)
            print(f"tuning {name}: {finished(folder)} of {TRIALS} trials", flush=True)
            commit(f"tuning {name}, trial {finished(folder)} of {TRIALS}", do_commit)


def tuned_knobs() -> dict:
    from lrdist.trial_files import load_records
    best = {}
    for name in ("flat", "ewc", "llrd", "lora"):
        records = [r for r in load_records(ROOT / "tune" / "trials" / f"tune-{name}") if r["state"] == "COMPLETE"]
        if len(records) >= TRIALS:
            best[name] = max(records[:TRIALS], key=lambda r: r["value"])["params"]
    return best


def run_heldout(do_commit: bool, methods=("flat", "combined", "ewc", "top3"), seeds=None, pairs=None) -> None:
    """Seed by seed over every pair and method, so that a study stopped early stays balanced."""
    from lrdist.evaluate import build_methods, evaluate, find_run
    seeds, pairs = SEEDS if seeds is None else seeds, HELDOUT_PAIRS if pairs is None else pairs
    files, tuned = combined_files(), tuned_knobs()
    if not all(f.is_file() for f in files.values()) or not {"flat", "ewc"} <= set(tuned):
        raise SystemExit("heldout: run --stage combine and --stage tune first")
    for seed in seeds:
        for pair in pairs:
            for label in methods:
                # top3 is the "combined" method of its own folder (evaluate names methods by label)
                out, name = (ROOT / "heldout-top3", "combined") if label == "top3" else (ROOT / "heldout", label)
                method = build_methods([name], str(files["top3" if label == "top3" else "combined"]), tuned)[name]
                if find_run(out, pair, name, seed, method, RECIPE) is not None:
                    continue
                evaluate(default_model(), [pair], RECIPE, [seed], str(out), methods=[name],
                         combined=str(files["top3" if label == "top3" else "combined"]), data_dir=data_dir(),
                         progress=False, tuned=tuned)
                commit(f"held-out run {pair_name(pair)} {label} seed {seed}", do_commit)


def bar_gains(runs: list[dict]) -> dict:
    """Held-out pair -> how far above its majority rate tuned flat learns the pair's first task (the mean over
    the registered seeds), for pairs whose registered flat runs are all in."""
    gains = {}
    for pair in HELDOUT_PAIRS:
        flat = [r for r in runs if r["method"] == "flat" and r["tasks"] == pair and r["seed"] in SEEDS
                and (r.get("majority_rate") or {}).get(pair[0]) is not None]  # (a run that recorded no rate: no bar)
        if len(flat) == len(SEEDS):
            gains[pair_name(pair)] = statistics.fmean(r["accuracy_matrix"][0][0] - r["majority_rate"][pair[0]]
                                                      for r in flat)
    return gains


def sensitivity_seeds(runs: list[dict]) -> dict:
    """The amendment of SCIENCE.md §4.1: once tuned flat's registered runs are all in, if some pair misses the
    bar, the pairs that meet it get seeds 0, 1, ... until they hold MIN_UNITS paired units together.
    Returns pair name -> its seeds, or {} (no pair misses, none meets it, or flat's runs are not all in)."""
    gains = bar_gains(runs)
    if len(gains) < len(HELDOUT_PAIRS) or all(g >= BAR for g in gains.values()):
        return {}
    meeting = [p for p, g in gains.items() if g >= BAR]
    if not meeting:
        return {}
    count = max(len(SEEDS), math.ceil(MIN_UNITS / len(meeting)))
    return {p: list(range(count)) for p in meeting}


def run_sensitivity(do_commit: bool) -> None:
    """The amendment's added seeds (if any pair misses the bar), seed by seed over the pairs that meet it."""
    chosen = sensitivity_seeds(load_runs())
    added = sorted({s for seeds in chosen.values() for s in seeds} - set(SEEDS))
    if chosen:
        print(f"sensitivity: pairs meeting the bar {', '.join(chosen)}; seeds {added[0]}-{added[-1]} added", flush=True)
        run_heldout(do_commit, seeds=added, pairs=[p for p in HELDOUT_PAIRS if pair_name(p) in chosen])


def sensitivity_missing(runs: list[dict]) -> int:
    """How many of the amendment's added runs are not in yet."""
    chosen = sensitivity_seeds(runs)
    have = {(pair_name(r["tasks"]), r["seed"], r["method"]) for r in runs}
    return sum((p, s, m) not in have for p, seeds in chosen.items() for s in seeds if s not in SEEDS
               for m in ["flat"] + METHODS)


def run_extra(do_commit: bool) -> None:
    """LLRD and LoRA, tuned on the same budget, on fewer seeds (if time allows): after the design's runs."""
    from lrdist.tune import tune_baselines
    runs = load_runs()
    if sum(r["method"] in ["flat"] + METHODS and r["seed"] in SEEDS for r in runs) < PLANNED or sensitivity_missing(runs):
        raise SystemExit("extra: the held-out and sensitivity runs come first (run --stage heldout, then sensitivity)")
    for name in ("llrd", "lora"):
        folder = ROOT / "tune" / "trials" / f"tune-{name}"
        while (done := finished(folder)) < TRIALS:
            tune_baselines(default_model(), SEARCH_PAIRS, RECIPE, done + 1, str(ROOT / "tune"), methods=[name],
                           data_dir=data_dir(), progress=False)
            commit(f"tuning {name}, trial {finished(folder)} of {TRIALS}", do_commit)
    run_heldout(do_commit, methods=("llrd", "lora"), seeds=EXTRA_SEEDS)


STAGES = {"search": run_searches, "combine": run_combine, "tune": run_tuning, "heldout": run_heldout,
          "sensitivity": run_sensitivity, "extra": run_extra}


# ---- report -------------------------------------------------------------------------------------------------
def load_runs(root: Path = ROOT) -> list[dict]:
    """The held-out runs, read and checked by lrdist's own loader: each file's fields, and all of them made
    from one model, recipe and device, with the same rows of every task (lrdist.evaluate.check_alike)."""
    from lrdist.evaluate import check_alike, check_one_run_per_unit, load_runs as read_runs
    runs = []
    for folder, relabel in ((root / "heldout" / "runs", {}), (root / "heldout-top3" / "runs", {"combined": "top3"})):
        if not any(folder.glob("*.json")):
            continue
        for run in read_runs([str(folder)]):
            runs.append({**run, "method": relabel.get(run["method"], run["method"])})
    check_alike(runs)
    check_one_run_per_unit(runs)  # a baseline tuned again would leave a second run of a unit
    return runs


def design_settings() -> dict:
    """Each label's method settings as the design runs it (identity.method_settings): the tuned baselines'
    best knobs, the combined distribution files. Labels not yet tuned or combined are left out."""
    from lrdist import identity
    from lrdist.evaluate import build_methods
    files, tuned = combined_files(), tuned_knobs()
    out = {}
    for label in ("flat", "combined", "top3", "ewc", "llrd", "lora"):
        name, file = ("combined", files["top3"]) if label == "top3" else (label, files["combined"])
        if (name != "combined" and name not in tuned) or not file.is_file():
            continue
        out[label] = json.loads(json.dumps(identity.method_settings(build_methods([name], str(file), tuned)[name],
                                                                     RECIPE)))
    return out


def check_design(runs: list[dict], settings: dict) -> None:
    """Every held-out run is one the design plans: a held-out pair, a planned seed, a planned method run
    with the design's settings (``design_settings``); anything else (a stray evaluate into these folders,
    a baseline tuned again) would enter the comparisons unseen. Refused in one line naming the file."""
    from lrdist import identity
    added = sensitivity_seeds(runs)
    for r in runs:
        label, seeds = r["method"], EXTRA_SEEDS if r["method"] in ("llrd", "lora") else SEEDS
        if label in ["flat"] + METHODS and pair_name(r["tasks"]) in added:  # the amendment's added seeds
            seeds = added[pair_name(r["tasks"])]
        where = f"{r.get('file')}: {label} on {pair_name(r['tasks'])} with seed {r['seed']}"
        if r["tasks"] not in HELDOUT_PAIRS or r["seed"] not in seeds or label not in settings:
            raise ValueError(f"{where} is not a run of the design (held-out pairs "
                             f"{', '.join(map(pair_name, HELDOUT_PAIRS))}; seeds {seeds[0]}-{seeds[-1]})")
        ident = identity.upgrade(r.get("identity"))
        got = ident.get("method") if isinstance(ident, dict) else None
        if not isinstance(got, dict):
            raise ValueError(f"{where} records no method settings: it cannot be checked against the design")
        if got != settings[label]:
            name = identity.first_difference(got, settings[label])
            run, plan = (identity.field(x, name, identity.MISSING) for x in (got, settings[label]))
            run, plan = ("missing" if v is identity.MISSING else identity.shown(v) for v in (run, plan))
            raise ValueError(f"{where} was made with other settings than the design's ({name}: {run} in the run, "
                             f"{plan} in the design)")


def value(run: dict, metric: str) -> float:
    if metric == "task 1 final":
        return run["accuracy_matrix"][1][0]
    if metric == "task 2":
        return run["accuracy_matrix"][1][1]
    return run[METRICS[metric]]


def comparisons(runs: list[dict]) -> list[dict]:
    """Every (method, metric) difference from tuned flat, blocked by pair; the primary one at LEVEL,
    the others (the family) with Bonferroni intervals and Holm p-values."""
    flat = {(pair_name(r["tasks"]), r["seed"]): r for r in runs if r["method"] == "flat"}
    rows = []
    for method in [m for m in METHODS + ["llrd", "lora"] if any(r["method"] == m for r in runs)]:
        for metric in METRICS:
            diffs: dict = {}
            for r in runs:
                key = (pair_name(r["tasks"]), r["seed"])
                if r["method"] == method and key in flat:
                    diffs.setdefault(key[0], []).append(value(r, metric) - value(flat[key], metric))
            if sum(map(len, diffs.values())) > len(diffs):
                rows.append({"method": method, "metric": metric, "diff": stats.blocked_difference(diffs),
                             "primary": (method, metric) == PRIMARY, "family": method in METHODS})
    family = [r for r in rows if r["family"] and not r["primary"]]
    for r, p in zip(family, stats.holm([r["diff"].p_value for r in family])):
        r["holm"] = p
        r["level"] = stats.bonferroni_level(LEVEL, FAMILY)  # the design's family, even while runs are missing
    for r in rows:
        r.setdefault("level", LEVEL)
    return rows


def report() -> str:
    from lrdist.methods import load_distribution
    from lrdist.trial_files import load_records
    runs = load_runs()
    check_design(runs, design_settings())
    lines = ["# The paper's question at CPU scale: results", "",
             "Made by `python benchmarks/paper_question.py report` from the JSON files under "
             "`benchmarks/science/paper_question/` (design: benchmarks/SCIENCE.md §4).", ""]
    # searches
    lines += [f"## Searches (held-out slice of the train splits, {RECIPE.heldout_samples} rows per task)", "",
              "| source pair | trials (complete / pruned) | flat 2e-4 | best | best − flat ± se |", "|---|---|---|---|---|"]
    dists = {}
    for pair in SEARCH_PAIRS:
        recs = load_records(ROOT / "search" / pair_name(pair) / "trials")
        done = [r for r in recs if r["state"] == "COMPLETE"]
        if not done:
            continue
        best = max(done, key=lambda r: r["value"])
        flat = next((r for r in done if r["user_attrs"].get("baseline")), None)
        dists[pair_name(pair)] = best["user_attrs"]["results"]["lrs"]
        se = stats.sum_se(best["user_attrs"]["results"]["objective_se"], flat["user_attrs"]["results"]["objective_se"]) if flat else math.nan
        lines.append(f"| {pair_name(pair)} | {len(done)} / {len(recs) - len(done)} | "
                     f"{flat['value'] if flat else math.nan:.3f} | {best['value']:.3f} (trial {best['number']}) | "
                     f"{stats.pm(best['value'] - flat['value'], se, 3) if flat else '-'} |")
    for label, path in combined_files().items():
        if path.is_file():
            dists[label] = load_distribution(str(path))[1]
    if dists:
        n = len(next(iter(dists.values())))
        lines += ["", "Distributions (LR per bert10 region; - = a region MiniLM does not have):", "",
                  "| distribution | " + " | ".join(f"r{k}" for k in range(n)) + " |", "|---" * (n + 1) + "|"]
        for name, lrs in dists.items():
            lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.1e}" for v in lrs) + " |")
        plot_distributions(dists, ROOT / "distributions.png")
        lines += ["", "![distributions](distributions.png)"]
    tuned = tuned_knobs()
    if tuned:
        lines += ["", f"Baselines tuned on the {len(SEARCH_PAIRS)} source pairs, {TRIALS} trials each (mean objective "
                  "over the pairs, held-out train slice): "
                  + "; ".join(f"{m}: " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                                    for k, v in knobs.items()) for m, knobs in tuned.items())]
    if not runs:
        return "\n".join(lines)
    lines += held_out_tables(runs)
    plot_tradeoff([r for r in runs if r["seed"] in SEEDS], ROOT / "tradeoff.png")
    lines += ["", "![forgetting against new-task accuracy](tradeoff.png)"]
    return "\n".join(lines)


def held_out_tables(all_runs: list[dict]) -> list[str]:
    """The registered analysis (seeds 0-9) and, where the amendment added seeds, its sensitivity analysis."""
    runs = [r for r in all_runs if r["seed"] in SEEDS]
    pairs = [pair_name(p) for p in HELDOUT_PAIRS]
    methods = [m for m in ["flat"] + METHODS + ["llrd", "lora"] if any(r["method"] == m for r in runs)]
    lines = ["", f"## Held-out pairs (validation split, at most {RECIPE.max_eval_samples} rows per task)", "",
             "Means over seeds; n = runs. Task 1 own = the first task right after its own training (majority "
             "rate in brackets); not learned = runs whose first task stayed within 2 se of its majority rate.", "",
             "| pair | method | n | task 1 own | task 1 final | task 2 | forgetting | objective | not learned |",
             "|---|---|---|---|---|---|---|---|---|"]
    for pair in pairs:
        for m in methods:
            mine = [r for r in runs if r["method"] == m and pair_name(r["tasks"]) == pair]
            if not mine:
                continue
            mean = lambda f: statistics.fmean(f(r) for r in mine)  # noqa: E731
            maj = mine[0].get("majority_rate", {}).get(mine[0]["tasks"][0])
            bad = sum(1 for r in mine if mine[0]["tasks"][0] in stats.unlearned(r))
            lines.append(f"| {pair} | {m} | {len(mine)} | {mean(lambda r: r['accuracy_matrix'][0][0]):.3f}"
                         f"{f' ({maj:.3f})' if maj is not None else ''} | {mean(lambda r: r['accuracy_matrix'][1][0]):.3f} | "
                         f"{mean(lambda r: r['accuracy_matrix'][1][1]):.3f} | {mean(lambda r: r['mean_forgetting']):+.3f} | "
                         f"{mean(lambda r: r['objective']):.3f} | {bad} |")
    for pair in pairs:  # the design's bar: flat learns the first task 10 points above its majority rate
        flat = [r for r in runs if r["method"] == "flat" and pair_name(r["tasks"]) == pair]
        if flat:
            first = flat[0]["tasks"][0]
            gain = statistics.fmean(r["accuracy_matrix"][0][0] - r["majority_rate"][first] for r in flat)
            lines.append(f"- {pair}: tuned flat learns {first} {100 * gain:+.1f} points above its majority rate "
                         f"({'meets' if gain >= BAR else 'MISSES'} the design's {100 * BAR:.0f}-point bar"
                         f"{'' if len(flat) == len(SEEDS) else f'; {len(flat)} of {len(SEEDS)} seeds in'})")
    planned = [r for r in runs if r["method"] in ["flat"] + METHODS]
    flat = {(pair_name(r["tasks"]), r["seed"]) for r in runs if r["method"] == "flat"}
    unpaired = [f"{r['method']} {pair_name(r['tasks'])} seed {r['seed']}" for r in runs
                if r["method"] != "flat" and (pair_name(r["tasks"]), r["seed"]) not in flat]
    lines.append(f"- Runs in: {len(planned)} of the {PLANNED} the design plans"
                 + ("" if len(planned) == PLANNED else " (the analysis below is provisional)")
                 + (f"; without a tuned-flat partner, so left out of the differences: {', '.join(unpaired)}"
                    if unpaired else ""))
    rows = comparisons(runs)
    lines += ["", "## Differences from tuned flat (paired by pair and seed, pairs as blocks)", "",
              "| method | measure | Δ (mean) | interval | level | p | Holm p | units | per pair |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["diff"]
        low, high = d.interval(r["level"])
        kind = "primary" if r["primary"] else ("Bonferroni" if r["family"] else "not in the family")
        per = ", ".join(f"{b} {m:+.3f} (n={k})" for b, (m, k) in d.per_block.items())
        lines.append(f"| {r['method']} | {r['metric']} | {d.mean:+.4f} | [{low:+.4f}, {high:+.4f}] | "
                     f"{100 * r['level']:.2f}% {kind} | {d.p_value:.3g} | {r.get('holm', float('nan')):.3g} | "
                     f"{d.n} | {per} |")
    primary = next((r for r in rows if r["primary"]), None)
    if primary:
        d = primary["diff"]
        lines += ["", f"Primary: combined − tuned flat on the objective = {d.mean:+.4f}, 95% interval "
                  f"[{d.interval()[0]:+.4f}, {d.interval()[1]:+.4f}] over {d.n} paired runs ({d.df} df); the smallest "
                  f"difference this design detects with 80% power at 5%: {d.detectable():.4f}."]
    return lines + sensitivity_lines(all_runs)


def sensitivity_lines(runs: list[dict]) -> list[str]:
    """The amendment's primary comparison on the pairs that meet the bar, their added seeds included."""
    chosen, gains = sensitivity_seeds(runs), bar_gains(runs)
    if len(gains) == len(HELDOUT_PAIRS) and all(g < BAR for g in gains.values()):
        return ["", f"No held-out pair's first task is learned by tuned flat {100 * BAR:.0f} points above its majority "
                "rate: at this recipe the study cannot answer the question (SCIENCE.md §4.1, amendment)."]
    if not chosen:
        return []
    units = [r for r in runs if pair_name(r["tasks"]) in chosen and r["seed"] in chosen[pair_name(r["tasks"])]]
    seeds = next(iter(chosen.values()))
    planned = len(chosen) * (len(seeds) - len(SEEDS)) * (1 + len(METHODS))
    got = sum(1 for r in units if r["method"] in ["flat"] + METHODS and r["seed"] not in SEEDS)
    flat = {(pair_name(r["tasks"]), r["seed"]): r for r in units if r["method"] == "flat"}
    diffs: dict = {}
    for r in units:
        key = (pair_name(r["tasks"]), r["seed"])
        if r["method"] == PRIMARY[0] and key in flat:
            diffs.setdefault(key[0], []).append(value(r, PRIMARY[1]) - value(flat[key], PRIMARY[1]))
    lines = ["", "## Sensitivity: the pairs whose first task tuned flat learns (SCIENCE.md §4.1, amendment)", "",
             f"Pairs meeting the bar: {', '.join(chosen)}, seeds {seeds[0]}-{seeds[-1]}; added runs in: {got} of {planned}"
             + ("" if got == planned else " (provisional)") + "."]
    if sum(map(len, diffs.values())) > len(diffs):
        d = stats.blocked_difference(diffs)
        low, high = d.interval()
        per = ", ".join(f"{b} {m:+.3f} (n={k})" for b, (m, k) in d.per_block.items())
        lines.append(f"Combined − tuned flat on the objective = {d.mean:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}] "
                     f"over {d.n} paired runs ({d.df} df; per pair: {per}); detectable with 80% power: "
                     f"{d.detectable():.4f}.")
    return lines


def plot_distributions(dists: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrdist.report import save_png
    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    for name, lrs in dists.items():
        xs = [k for k, v in enumerate(lrs) if v is not None]
        ax.plot(xs, [lrs[k] for k in xs], marker="o", label=name, lw=2.5 if name == "combined" else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("bert10 region (0 = embeddings, 9 = pooler and heads)")
    ax.set_ylabel("learning rate")
    ax.set_title("Best distribution of each source pair, and their combinations")
    ax.legend(fontsize=8)
    save_png(fig, path)


def plot_tradeoff(runs: list[dict], path: Path) -> None:
    """Forgetting against new-task accuracy, mean and 95% interval per method, one panel per held-out pair."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrdist.report import save_png
    pairs = [pair_name(p) for p in HELDOUT_PAIRS]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.5), squeeze=False, layout="constrained")
    for ax, pair in zip(axes[0], pairs):
        for m in ["flat"] + METHODS + ["llrd", "lora"]:
            mine = [r for r in runs if r["method"] == m and pair_name(r["tasks"]) == pair]
            if len(mine) < 2:
                continue
            x = [r["accuracy_matrix"][1][1] for r in mine]
            y = [r["mean_forgetting"] for r in mine]
            t = stats.t_critical(len(mine) - 1)
            half = lambda v: t * statistics.stdev(v) / math.sqrt(len(v))  # noqa: E731
            ax.errorbar(statistics.fmean(x), statistics.fmean(y), xerr=half(x), yerr=half(y), fmt="o", capsize=3,
                        label=f"{m} (n={len(mine)})")
        ax.set_title(pair.replace("-", " → "))
        ax.set_xlabel("second task's accuracy")
        ax.set_ylabel("forgetting of the first task")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    fig.suptitle("Held-out pairs: lower forgetting at higher new-task accuracy is better (means, 95% intervals)")
    save_png(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="do what is missing")
    run.add_argument("--stage", default="all", choices=["all", *STAGES])
    run.add_argument("--commit", action="store_true", help="git-commit each finished unit's files")
    sub.add_parser("report", help="tables and plots from the committed files")
    args = p.parse_args(argv)
    if args.command == "report":
        from lrdist.files import write_atomic
        try:
            text = report()
        except (ValueError, OSError) as exc:  # a damaged or mismatched file: one line naming it
            raise SystemExit(f"paper_question report: error: {exc}") from None
        write_atomic(ROOT / "report.md", text + "\n")
        print(text)
        return
    for name in (["search", "combine", "tune", "heldout", "sensitivity"] if args.stage == "all" else [args.stage]):
        STAGES[name](args.commit)


if __name__ == "__main__":
    main()
