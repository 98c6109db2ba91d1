"""Stored results are reused only when made from the same things (issue 18). evaluate, its baseline tuning,
search and finetune each refuse, before any work and in one line naming the field, an output made with
another model, other data, another recipe or a distribution file rewritten with other LRs; the same
command reuses what is there; --force moves the old files aside (nothing deleted) and runs again."""
import json
import math
import re
import os
import shutil
from dataclasses import replace

import optuna
import pytest

from conftest import load_paper_question
from lrdist.cli import main
from lrdist.continual import RECIPES

SMALL = ["--max-train-samples", "16", "--max-eval-samples", "16", "--max-length", "32", "--no-progress"]
CLI_RECIPE = replace(RECIPES["fast"], max_train_samples=16, max_eval_samples=16, max_length=32)  # what SMALL makes
LRS = [2e-4, 1e-4, 5e-5, 1e-4, None, 2e-5, 1e-4, 1e-4, None, 1e-5]


def tree(root) -> dict:
    """Every file under root with its bytes' hash and modification time."""
    import hashlib
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[path] = (hashlib.sha256(open(path, "rb").read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def one_error_line(capfd) -> str:
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---- evaluate -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, minilm_path, glue_dir):
    """A finished `lrdist evaluate` of flat and a combined distribution on RTE then MRPC, seed 0."""
    root = tmp_path_factory.mktemp("evaluated")
    (root / "combined.json").write_text(json.dumps({"kind": "absolute", "lrs": LRS}))
    argv = ["evaluate", "--model", str(minilm_path), "--data-dir", str(glue_dir), "--pairs", "rte,mrpc", "--seeds", "0",
            "--methods", "flat,combined", "--combined", str(root / "combined.json"), "--output", str(root / "out"), *SMALL]
    assert main(argv) == 0
    return root, argv


def run_files(folder, label: str = "*") -> list:
    """The run files of ``label`` in OUTPUT/runs (named PAIR-LABEL-seedS-<settings hash>.json)."""
    return sorted((folder / "runs").glob(f"rte-mrpc-{label}-seed0-*.json"))


@pytest.mark.parametrize("change,field", [
    ("model", "model (its weights, config or tokenizer files)"),
    ("data", "data.rte.validation (the rows used)"),
    ("recipe", "recipe.max_length: 32 then, 33 now"),
])
@pytest.mark.parametrize("methods", ["flat,combined", "ewc"])
def test_evaluate_refuses_runs_made_from_something_else(evaluated, other_model, other_glue, change, field, methods,
                                                        capfd):
    """Every run in OUTPUT/runs is checked, those of other methods too (ewc has none there): runs on other
    data or of another model are never summarised together."""
    root, argv = evaluated
    argv = list(argv)
    argv[argv.index("--methods") + 1] = methods
    if change == "model":
        argv[argv.index("--model") + 1] = str(other_model)
    elif change == "data":
        argv[argv.index("--data-dir") + 1] = str(other_glue)
    elif change == "recipe":
        argv += ["--max-length", "33"]
    before = tree(root / "out")
    capfd.readouterr()
    assert main(argv) == 2
    line = one_error_line(capfd)
    assert re.match(rf"lrdist evaluate: error: the saved run {re.escape(str(root / 'out' / 'runs'))}/"
                    rf"rte-mrpc-(flat|combined)-seed0-[0-9a-f]{{8}}.json was made from something else: "
                    rf"{re.escape(field)}", line), line
    assert "use another --output, or --force to move the old files into" in line
    assert tree(root / "out") == before  # refused before any work: nothing written, moved or trained


def test_evaluate_runs_a_rewritten_distribution_again_beside_the_old_run(evaluated, tmp_path, capfd):
    """A distribution file rewritten at the same path with other LRs is another method: its run is made
    (under the name of its settings), the old one is kept, never reused for it."""
    root, argv = evaluated
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    (tmp_path / "combined.json").write_text(json.dumps({"kind": "absolute", "lrs": LRS[:-1] + [3e-5]}))
    argv = [*argv, "--methods", "combined", "--combined", str(tmp_path / "combined.json")]
    argv[argv.index("--output") + 1] = str(out)
    old = {p: p.read_bytes() for p in run_files(out)}
    capfd.readouterr()
    assert main(argv) == 0
    assert "rte-mrpc     combined  seed 0: objective" in capfd.readouterr().out  # trained, not reused
    assert {p: p.read_bytes() for p in run_files(out) if p in old} == old
    new = [p for p in run_files(out, "combined") if p not in old]
    assert len(new) == 1 and json.loads(new[0].read_text())["identity"]["method"]["lrs"][-1] == 3e-5


def test_evaluate_tuned_flat_at_the_recipe_lr_reuses_flat_and_retuning_never_refuses(evaluated, tmp_path, capfd):
    """Tuning first tries the recipe's LR: with one trial the tuned flat is the untuned flat run (reused).
    More trials may tune it elsewhere: then it is a new run beside the old, never a refusal after tuning."""
    root, argv = evaluated
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    argv = [*argv, "--methods", "flat", "--search-pairs", "rte,mrpc"]
    argv[argv.index("--output") + 1] = str(out)
    flat = {p: p.read_bytes() for p in run_files(out, "flat")}
    capfd.readouterr()
    assert main([*argv, "--tune-baselines", "1"]) == 0
    assert "seed 0: objective" not in capfd.readouterr().out  # the flat run, reused
    assert {p: p.read_bytes() for p in run_files(out, "flat")} == flat
    assert main([*argv, "--tune-baselines", "2"]) == 0
    tuned = json.loads((out / "tuned.json").read_text())["best"]["flat"]["lr"]
    runs = run_files(out, "flat")
    assert {p: p.read_bytes() for p in runs if p in flat} == flat  # the untuned run is kept
    assert len(runs) == (1 if tuned == CLI_RECIPE.lr else 2)
    assert json.loads((out / "evaluate.json").read_text())["runs"][0]["identity"]["method"] == {"method": "flat", "lr": tuned}


def test_summary_refuses_runs_on_other_data(evaluated, other_glue, tmp_path, capfd):
    root, argv = evaluated
    argv = list(argv)
    argv[argv.index("--methods") + 1] = "ewc"
    argv[argv.index("--data-dir") + 1] = str(other_glue)
    argv[argv.index("--output") + 1] = str(tmp_path / "other")
    assert main(argv) == 0
    capfd.readouterr()
    assert main(["summary", str(root / "out"), str(tmp_path / "other"), "--output", str(tmp_path / "s.md")]) == 2
    line = one_error_line(capfd)
    assert "were made from different things (data.rte.validation (the rows used)" in line, line
    assert not (tmp_path / "s.md").exists()


def test_evaluate_reuses_runs_made_from_the_same_things(evaluated, capfd):
    root, argv = evaluated
    runs = {p: p.read_bytes() for p in (root / "out" / "runs").iterdir()}
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    capfd.readouterr()
    assert main(argv) == 0
    out = capfd.readouterr().out
    assert "seed 0: objective" not in out  # that line is printed for a run that trains: none did
    assert {p: p.read_bytes() for p in runs} == runs and {p: p.stat().st_mtime_ns for p in runs} == stamps
    summary = json.loads((root / "out" / "evaluate.json").read_text())
    assert sorted(r["method"] for r in summary["runs"]) == ["combined", "flat"]
    # the table: n = 1 run per method, so no spread ('-'), and the tasks each run did not learn
    table = (root / "out" / "evaluate.md").read_text()
    for run in summary["runs"]:
        bad = [t for i, t in enumerate(run["tasks"])
               if run["accuracy_matrix"][i][i] - run["majority_rate"][t]
               <= 2 * math.sqrt(max(run["majority_rate"][t] * (1 - run["majority_rate"][t]), 1 / run["eval_samples"][t])
                                / run["eval_samples"][t])]
        row = next(line for line in table.splitlines() if line.startswith(f"| {run['method']} | 1 | "))
        assert row.count("± -") == 3 and row.endswith(f"| {', '.join(f'{t} 1/1' for t in bad) or 'none'} |"), row
    assert "Not learned:" in table or "none |" in table
    # `lrdist summary` re-makes the same table from the run files alone (as from a committed folder)
    assert main(["summary", str(root / "out"), "--output", str(root / "again.md")]) == 0
    assert (root / "again.md").read_text() == table


def test_evaluate_force_moves_old_runs_aside_and_reruns(evaluated, tmp_path, capfd):
    root, argv = evaluated
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    old = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = [*argv, "--max-length", "33", "--methods", "flat", "--force"]
    argv[argv.index("--output") + 1] = str(out)
    assert main(argv) == 0
    err = capfd.readouterr().err
    aside = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and f"into {aside[0]}" in err
    # every run of the old recipe goes (the combined one too: it would not be summarised with the new
    # ones), kept byte for byte with the old summary
    moved = [str(p.relative_to(root / "out")) for p in run_files(root / "out")] + ["evaluate.json", "evaluate.md"]
    for rel in moved:
        assert (aside[0] / rel).read_bytes() == old[rel]
    (new_run,) = run_files(out)
    new = json.loads(new_run.read_text())
    assert new["method"] == "flat" and new["identity"]["recipe"]["max_length"] == 33 and new["recipe"]["max_length"] == 33


# ---- tuning -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(tmp_path_factory, minilm_path, glue_dir):
    """OUTPUT/tune.db holding one finished tuning trial of the flat LR on RTE then MRPC."""
    from lrdist.tune import tune_baselines
    out = tmp_path_factory.mktemp("tuned")
    tune_baselines(str(minilm_path), [["rte", "mrpc"]], CLI_RECIPE, 1, str(out), methods=["flat"],
                   data_dir=str(glue_dir), progress=False)
    return out


@pytest.mark.parametrize("change,field", [
    ("model", "model (its weights, config or tokenizer files)"),
    ("data", "data.rte.train (the rows used)"),
    ("recipe", "recipe.lr: 0.0002 then, 0.0001 now"),
])
def test_tuning_refuses_a_study_made_from_something_else(tuned, minilm_path, glue_dir, other_model, other_glue,
                                                         change, field, capfd):
    model = str(other_model if change == "model" else minilm_path)
    data = str(other_glue if change == "data" else glue_dir)
    extra = ["--lr", "1e-4"] if change == "recipe" else []
    if change == "data":  # the held-out slice a tuning trial scores on comes from train: flip train labels too
        data = str(flipped_train(other_glue))
    before = tree(tuned)
    capfd.readouterr()
    assert main(["evaluate", "--model", model, "--data-dir", data, "--pairs", "rte,mrpc", "--seeds", "0",
                 "--methods", "flat", "--tune-baselines", "1", "--search-pairs", "rte,mrpc", "--output", str(tuned),
                 *SMALL, *extra]) == 2
    line = one_error_line(capfd)
    assert line.startswith(f"lrdist evaluate: error: the tuning study tune-flat in {tuned / 'tune.db'} was made from "
                           f"something else: {field}"), line
    assert "--force" in line
    assert tree(tuned) == before
    study = optuna.load_study(study_name="tune-flat", storage=f"sqlite:///{tuned / 'tune.db'}")
    assert len(study.trials) == 1  # no trial added: the first model's knobs are not inherited


def flipped_train(glue):
    """A copy of ``glue`` whose RTE train labels are flipped as well (once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    target = glue.parent / "glue-train-flipped"
    if not target.exists():
        shutil.copytree(glue, target)
        path = next((target / "rte").glob("train-*.parquet"))
        table = pq.read_table(path)
        labels = pa.array([1 - v for v in table.column("label").to_pylist()], table.schema.field("label").type)
        pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", labels), path)
    return target


# ---- search -------------------------------------------------------------------------------------------------
@pytest.fixture
def search_copy(cli_search, tmp_path):
    """A copy of the session's one-trial search folder, its search.json naming its own study.db."""
    folder = tmp_path / "search"
    shutil.copytree(cli_search[0], folder)
    meta = folder / "search.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "storage": f"sqlite:///{folder / 'study.db'}"}))
    return folder


def search_argv(model, data, folder, *extra):
    return ["search", "--model", str(model), "--data-dir", str(data), "--tasks", "rte,mrpc", "--output", str(folder),
            "--trials", "1", "--pruner", "none", "--objective", "mean_accuracy", *SMALL, *extra]


def trials_of(folder):
    study = optuna.load_study(study_name="lrdist-rte-mrpc", storage=f"sqlite:///{folder / 'study.db'}")
    return [(t.number, t.state, t.value, t.params) for t in study.trials]


@pytest.mark.parametrize("change,field", [
    ("model", "model (its weights, config or tokenizer files)"),
    ("data", "data.rte.train (the rows used)"),
    ("recipe", "recipe.max_length: 32 then, 33 now"),
    ("sampler", 'sampler: "tpe" then, "gp" now'),
])
def test_search_refuses_a_study_made_from_something_else(search_copy, minilm_path, glue_dir, other_model, other_glue,
                                                         change, field, capfd):
    model = other_model if change == "model" else minilm_path
    data = flipped_train(other_glue) if change == "data" else glue_dir
    extra = {"recipe": ["--max-length", "33"], "sampler": ["--sampler", "gp"]}.get(change, [])
    before, trials = tree(search_copy), trials_of(search_copy)
    capfd.readouterr()
    assert main(search_argv(model, data, search_copy, *extra)) == 2
    line = one_error_line(capfd)
    assert line.startswith(f"lrdist search: error: study 'lrdist-rte-mrpc' in sqlite:///{search_copy / 'study.db'} was "
                           f"made from something else: {field}"), line
    assert "--force" in line
    assert trials_of(search_copy) == trials
    assert set(tree(search_copy)) == set(before)  # no file added or removed
    assert {p: v for p, v in tree(search_copy).items() if not p.endswith("study.db")} == \
           {p: v for p, v in before.items() if not p.endswith("study.db")}


def test_search_force_moves_the_old_study_aside(search_copy, minilm_path, glue_dir, capfd):
    old = trials_of(search_copy)
    assert main(search_argv(minilm_path, glue_dir, search_copy, "--max-length", "33", "--force")) == 0
    aside = [p for p in search_copy.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and trials_of(aside[0]) == old  # the old study, intact
    for name in ("search.json", "combined.json", "report.md"):
        assert (aside[0] / name).is_file() and (search_copy / name).is_file()
    study = optuna.load_study(study_name="lrdist-rte-mrpc", storage=f"sqlite:///{search_copy / 'study.db'}")
    assert study.user_attrs["identity"]["recipe"]["max_length"] == 33 and len(study.trials) == 1
    assert json.loads((search_copy / "search.json").read_text())["identity"] == study.user_attrs["identity"]


# ---- finetune -----------------------------------------------------------------------------------------------
def test_finetune_reuses_a_finished_run_refuses_another_and_force_moves_it_aside(tmp_path, minilm_path, glue_dir,
                                                                               other_model, capfd):
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(minilm_path), "--data-dir", str(glue_dir), "--tasks", "rte,mrpc",
            "--output", str(out), *SMALL]
    assert main(argv) == 0
    first = (out / "results.json").read_bytes()
    stamp = (out / "results.json").stat().st_mtime_ns
    assert json.loads(first)["identity"]["method"] == {"method": "flat", "lr": CLI_RECIPE.lr}  # the LR it ran with
    capfd.readouterr()
    assert main(argv) == 0  # the same run: shown, not trained again
    assert "shown, not trained again" in capfd.readouterr().out
    assert (out / "results.json").read_bytes() == first and (out / "results.json").stat().st_mtime_ns == stamp
    other = [*argv, "--model", str(other_model)]
    assert main(other) == 2
    line = one_error_line(capfd)
    assert "was made from something else: model (its weights, config or tokenizer files)" in line and "--force" in line
    assert (out / "results.json").read_bytes() == first and sorted(os.listdir(out)) == ["results.json"]
    assert main([*other, "--force"]) == 0
    aside = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and (aside[0] / "results.json").read_bytes() == first
    assert json.loads((out / "results.json").read_text())["identity"]["model"] != json.loads(first)["identity"]["model"]


@pytest.mark.parametrize("field,value", [("objective", "x"), ("objective", None), ("seed", [0]), ("method_stats", None),
                                         ("identity.versions", "x"), ("majority_rate", {"rte": 0.5}),
                                         ("tasks", "rte"), ("objective", 1e300), ("objective", 2.5),
                                         ("mean_forgetting", -1.5), ("mean_final_accuracy", 1e300)])
def test_a_hand_edited_run_file_is_named_in_one_line(evaluated, tmp_path, field, value, capfd):
    root, argv = evaluated
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    path = run_files(out, "flat")[0]
    run = json.loads(path.read_text())
    if "." in field:
        run["identity"]["versions"] = value
    else:
        run[field] = value
    path.write_text(json.dumps(run))
    capfd.readouterr()
    assert main(["summary", str(out / "runs"), "--output", str(tmp_path / "s.md")]) == 2
    line = one_error_line(capfd)
    assert f"{path.name}: field {field} " in line, line
    argv = list(argv)
    argv[argv.index("--output") + 1] = str(out)
    assert main(argv) == 2  # evaluate names it too, before any work
    assert f"{path.name}: field {field} " in one_error_line(capfd)


def test_a_run_file_that_is_not_an_object_is_named_in_one_line(evaluated, tmp_path, capfd):
    root, argv = evaluated
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    path = out / "runs" / "rte-mrpc-flat-seed1-00000000.json"
    path.write_text("[1, 2]")
    capfd.readouterr()
    for source in (out, out / "runs", path):
        assert main(["summary", str(source), "--output", str(tmp_path / "s.md")]) == 2
        assert f"{path}: field (the whole file) must be an object" in one_error_line(capfd)
    argv = list(argv)
    argv[argv.index("--output") + 1] = str(out)
    assert main(argv) == 2
    assert f"{path}: field (the whole file) must be an object" in one_error_line(capfd)
    assert not (tmp_path / "s.md").exists()


def test_a_run_file_whose_method_settings_were_edited_is_not_reused(evaluated, tmp_path, capfd):
    """The file named by flat's settings hash, its recorded LR edited: its numbers are not flat's at that
    LR, so evaluate refuses it before any work (naming the field), and --force moves it aside and reruns."""
    root, argv = evaluated
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    (path,) = run_files(out, "flat")
    run = json.loads(path.read_text())
    assert run["identity"]["method"] == {"method": "flat", "lr": CLI_RECIPE.lr}
    run["identity"]["method"]["lr"] = 1e-3
    path.write_text(json.dumps(run))
    before = tree(out)
    argv = list(argv)
    argv[argv.index("--output") + 1] = str(out)
    capfd.readouterr()
    assert main(argv) == 2
    line = one_error_line(capfd)
    assert f"{path}: field identity.method " in line and '"lr": 0.001' in line and "--force" in line, line
    assert tree(out) == before
    assert main([*argv, "--methods", "flat", "--force"]) == 0
    assert "flat      seed 0: objective" in capfd.readouterr().out  # trained again
    aside = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and json.loads((aside[0] / "runs" / path.name).read_text()) == run
    assert json.loads(path.read_text())["identity"]["method"] == {"method": "flat", "lr": CLI_RECIPE.lr}


def test_summary_labels_two_runs_of_one_label_by_the_setting_that_differs(evaluated, tmp_path, capfd):
    """evaluate keeps a run of other method settings (here an old-name flat run at another LR, as a retuned
    flat leaves) beside the current one and reuses the current one; summary shows both, each labelled by
    the setting that tells them apart, and withholds the differences from flat (which flat?) saying why.
    Two copies of one run with the same settings but other results are still refused."""
    root, argv = evaluated
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    (path,) = run_files(out, "flat")
    run = json.loads(path.read_text())
    run["identity"]["method"]["lr"] = 1e-3
    run["objective"] = round(run["objective"] / 2, 6)
    old = out / "runs" / "rte-mrpc-flat-seed0.json"
    old.write_text(json.dumps(run))
    argv = list(argv)
    argv[argv.index("--output") + 1] = str(out)
    capfd.readouterr()
    assert main(argv) == 0
    assert "seed 0: objective" not in capfd.readouterr().out  # the current flat run is reused
    assert main(["summary", str(out / "runs"), "--output", str(tmp_path / "s.md")]) == 0
    table = (tmp_path / "s.md").read_text()
    current = json.loads(path.read_text())
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| flat")}
    assert set(rows) == {"flat (lr=0.001)", f"flat (lr={CLI_RECIPE.lr})"}
    assert f"{run['objective']:.4f}" in rows["flat (lr=0.001)"]
    assert f"{current['objective']:.4f}" in rows[f"flat (lr={CLI_RECIPE.lr})"]
    assert "No Δ vs flat: flat was run with 2 settings" in table
    # the pre-registered study takes one run per method and unit: a second flat is refused, not paired
    pq = load_paper_question()
    (tmp_path / "study" / "heldout").mkdir(parents=True)
    shutil.copytree(out / "runs", tmp_path / "study" / "heldout" / "runs")
    with pytest.raises(ValueError, match="both hold flat on rte-mrpc with seed 0; summarise them separately"):
        pq.load_runs(tmp_path / "study")
    assert all(line.split("|")[4].strip() == "—" for line in table.splitlines()[4:] if line.startswith("| "))
    # one of them alone: an ordinary summary with its differences from flat
    others = [p for p in (out / "runs").glob("*.json") if p != old]
    assert main(["summary", *map(str, others), "--output", str(tmp_path / "t.md")]) == 0
    assert "No Δ" not in (tmp_path / "t.md").read_text()
    # the same settings and other results: two copies disagree, refused naming both files
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps({**current, "objective": current["objective"] / 2}))
    assert main(["summary", str(path), str(copy), "--output", str(tmp_path / "u.md")]) == 2
    line = one_error_line(capfd)
    assert f"{copy} and {path} both hold flat on rte-mrpc with seed 0 and the same settings" in line, line


def test_a_run_file_written_before_the_new_identity_fields_is_reused(evaluated, tmp_path, capfd):
    """A run file as the earlier code wrote it (named PAIR-LABEL-seedS.json, its identity without device and
    precision, flat without its LR): evaluate reuses it and summary reads it; a genuine mismatch is refused."""
    root, argv = evaluated
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    for path in run_files(out):
        run = json.loads(path.read_text())
        ident = {k: v for k, v in run["identity"].items() if k not in ("device", "precision")}
        if ident["method"]["method"] == "flat":
            ident["method"] = {"method": "flat"}
        path.unlink()
        (out / "runs" / f"rte-mrpc-{run['method']}-seed0.json").write_text(json.dumps({**run, "identity": ident}))
    before = tree(out / "runs")
    argv = list(argv)
    argv[argv.index("--output") + 1] = str(out)
    capfd.readouterr()
    assert main(argv) == 0
    assert "seed 0: objective" not in capfd.readouterr().out  # both runs reused
    assert tree(out / "runs") == before
    assert main(["summary", str(out / "runs"), "--output", str(tmp_path / "s.md")]) == 0
    capfd.readouterr()
    assert main([*argv, "--max-length", "33"]) == 2
    assert "seed0.json was made from something else: recipe.max_length: 32 then, 33 now" in one_error_line(capfd)


def test_variant_labels_stay_apart_and_unrecorded_runs_join_their_label():
    """Settings that print alike when cut short (long distributions) are told apart by their hash; runs
    that recorded no settings stay in their label's row when it has one recorded setting; two runs of one
    row on one unit are refused, never averaged as two units."""
    from lrdist.evaluate import check_one_run_per_unit, label_variants, settings_tag
    long_a = {"method": "dist", "lrs": [2e-4, 1e-4, 5e-5, 1e-4, None, 2e-5, 1e-4, 1e-4, None, 3e-4]}
    long_b = {**long_a, "lrs": long_a["lrs"][:9] + [4e-4]}
    run = lambda label, seed, method: {"method": label, "tasks": ["rte", "mrpc"], "seed": seed,  # noqa: E731
                                       "identity": None if method is None else {"method": method}}
    runs = [run("combined", 0, long_a), run("combined", 0, long_b), run("flat", 0, {"method": "flat", "lr": 2e-4}),
            run("flat", 1, None)]
    labels = [r["method"] for r in label_variants(runs)]
    assert labels[0] != labels[1] and labels[0].endswith(f"settings {settings_tag(long_a)})")
    assert labels[1].endswith(f"settings {settings_tag(long_b)})") and labels[2:] == ["flat", "flat"]
    check_one_run_per_unit(label_variants(runs))
    runs.append(run("flat", 1, {"method": "flat", "lr": 2e-4}))  # joins "flat": seed 1 twice in one row
    with pytest.raises(ValueError, match="both hold flat on rte-mrpc with seed 1; summarise them separately"):
        check_one_run_per_unit(label_variants(runs))
    runs.append(run("flat", 2, {"method": "flat", "lr": 1e-3}))  # two recorded settings: three rows
    assert sorted({r["method"] for r in label_variants(runs) if r["method"].startswith("flat")}) == [
        "flat (lr=0.0002)", "flat (lr=0.001)", "flat (settings not recorded)"]


def test_paper_question_report_reads_runs_through_the_checked_loader(evaluated, tmp_path):
    """benchmarks/paper_question.py's report loads held-out runs with lrdist's loader: a run on other rows
    of a task, or a damaged file, is one error, never a table."""
    pq = load_paper_question()
    root, _ = evaluated
    shutil.copytree(root / "out" / "runs", tmp_path / "heldout" / "runs")
    assert sorted(r["method"] for r in pq.load_runs(tmp_path)) == ["combined", "flat"]
    path = run_files(tmp_path / "heldout", "flat")[0]
    run = json.loads(path.read_text())
    run["identity"]["data"]["rte"]["validation"] = "sha256:" + "0" * 64
    path.write_text(json.dumps(run))
    with pytest.raises(ValueError, match=r"made from different things \(data.rte.validation"):
        pq.load_runs(tmp_path)
    path.write_text(json.dumps(run)[:50])
    with pytest.raises(ValueError, match=r"is not valid JSON"):
        pq.load_runs(tmp_path)
