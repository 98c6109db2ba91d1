"""A Markdown report with tables and matplotlib PNGs: the distributions found, the combined one, the
optimisation history, and (if evaluated) forgetting and objective per method."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lrdist.combine import open_studies  # noqa: E402
from lrdist.evaluate import format_summary  # noqa: E402
from lrdist.files import read_json, write_atomic  # noqa: E402
from lrdist.methods import PAPER_COMBINED  # noqa: E402
from lrdist.search import completed_trials, format_trials  # noqa: E402


def save_png(fig, path: Path) -> None:
    """The figure as a PNG, written whole (lrdist.files), then closed."""
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def _nan(values) -> list[float]:
    return [float("nan") if v is None else v for v in values]


def plot_distributions(studies, combined: list | None, path: Path) -> None:
    """Each study's best distribution, the combined one and the paper's; regions empty in the searched
    model (None) are left as gaps and shaded grey."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    n = len(combined) if combined else 10
    empty = set(range(n)) if combined else set()
    for study in studies:
        best = completed_trials(study)
        if best:
            lrs = best[0].user_attrs["results"]["lrs"]
            empty &= {i for i, v in enumerate(lrs) if v is None}
            ax.plot(_nan(lrs), marker="o", alpha=0.7, label=f"best of {study.study_name}")
    if combined:
        empty &= {i for i, v in enumerate(combined) if v is None}
    ax.plot(PAPER_COMBINED, ls="--", color="grey", label="paper: BERTcL combined")
    if combined:
        ax.plot(_nan(combined), marker="s", lw=2.5, color="black", label="combined (this run)")
    for i, r in enumerate(sorted(empty)):
        ax.axvspan(r - 0.4, r + 0.4, color="lightgrey", alpha=0.6, label="empty region (no parameters)" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(range(n))
    ax.set_xlabel("region (0 embeddings ... last: head)")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning-rate distribution per region")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


OBJECTIVE_LABELS = {"paper": "objective: first task after the last + last task accuracy",
                    "mean_accuracy": "objective: mean final accuracy",
                    "forgetting": "objective: minus mean forgetting"}


def objective_label(studies) -> str:
    """The y label of the history: the objective(s) the studies were run with."""
    names = sorted({s.user_attrs.get("identity", {}).get("objective", "paper") for s in studies})
    return " / ".join(OBJECTIVE_LABELS.get(n, f"objective: {n}") for n in names)


def plot_history(studies, path: Path):
    """Objective per trial and best so far; returns the axes drawn."""
    from optuna.trial import TrialState
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for study in studies:
        pruned = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.intermediate_values]
        if pruned:  # where a pruned trial stood when it was stopped
            ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                       marker="x", color="grey", alpha=0.6, label=f"{study.study_name}: pruned (last value)")
        trials = sorted(completed_trials(study), key=lambda t: t.number)
        if not trials:
            continue
        xs, ys = [t.number for t in trials], [t.value for t in trials]
        best = [max(ys[: i + 1]) for i in range(len(ys))]
        ax.scatter(xs, ys, s=18, alpha=0.6)
        ax.step(xs, best, where="post", label=f"{study.study_name}: best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # trials are whole numbers
    ax.set_ylabel(objective_label(studies))
    ax.set_title("Optimisation history")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    return ax


def plot_methods(evaluation: dict, path: Path) -> None:
    """Left: objective per method (mean ± std over runs). Right: the paired difference from flat with its
    95% confidence interval; a bar whose interval crosses 0 shows no difference."""
    rows = sorted(evaluation["summary"], key=lambda r: -r["objective"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar([f"{r['method']}\nn = {r['runs']}" for r in rows], [r["objective"] for r in rows],
                yerr=[r["objective_std"] or 0.0 for r in rows], capsize=4, color="tab:blue")  # one run: no bar
    axes[0].set_title("objective, mean ± std (higher is better)")
    others = [r for r in rows if "objective_vs_flat" in r]
    if others:
        d = [r["objective_vs_flat"] for r in others]
        err = [[x["mean"] - x["low"] for x in d], [x["high"] - x["mean"] for x in d]]
        colors = ["tab:green" if x["excludes_zero"] and x["mean"] > 0 else
                  "tab:red" if x["excludes_zero"] else "tab:grey" for x in d]
        axes[1].bar([r["method"] for r in others], [x["mean"] for x in d], yerr=err, capsize=4, color=colors)
    axes[1].axhline(0.0, color="black", lw=0.8)
    axes[1].set_title("Δ objective vs flat, 95% CI (grey: not distinguishable)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def make_report(sources: list[str], output: str, combined_file: str | None = None,
                evaluate_file: str | None = None) -> Path:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    studies = [s for src in sources for s in open_studies(src)]
    combined = read_json(combined_file, "--combined") if combined_file else None
    lines = ["# lrdist report", ""]
    plot_distributions(studies, combined["lrs"] if combined else None, out / "distributions.png")
    plot_history(studies, out / "history.png")
    lines += ["## Distributions", "", "![distributions](distributions.png)", ""]
    if combined:
        lines += [f"Combined ({combined['rule']} mean of the top {combined['top_k']} trial(s) of "
                  f"{len(combined['studies'])} stud{'y' if len(combined['studies']) == 1 else 'ies'}):", "",
                  "| region | " + " | ".join(str(i) for i in range(len(combined["lrs"]))) + " |",
                  "|---|" + "---|" * len(combined["lrs"]),
                  "| LR | " + " | ".join("— (empty)" if v is None else f"{v:.2e}" for v in combined["lrs"]) + " |",
                  ""]
    lines += ["## Searches", "", "![history](history.png)", ""]
    for study in studies:
        lines += ["```", format_trials(study), "```", ""]
    if evaluate_file:
        evaluation = read_json(evaluate_file, "--evaluation")
        plot_methods(evaluation, out / "methods.png")
        lines += ["## Methods on held-out sequences", "", format_summary(evaluation), "",
                  "![methods](methods.png)", ""]
    return write_atomic(out / "report.md", "\n".join(lines) + "\n")
