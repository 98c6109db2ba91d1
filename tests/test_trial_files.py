"""A study kept as trial files resumes on another machine: finished trials saved once each, and a fresh
study rebuilt from them with the same numbers, values, params and pruning history (issue 19)."""
import json
import shutil

import optuna
import pytest
from optuna.trial import TrialState

from lrdist import trial_files
from lrdist.cli import main
from lrdist.identity import IdentityMismatch

SMALL = ["--max-train-samples", "16", "--max-eval-samples", "16", "--max-length", "32", "--no-progress"]


def made_study(tmp_path):
    """A real SQLite study with complete, pruned and failed trials, its identity set."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'a.db'}", study_name="s", direction="maximize")
    study.set_user_attr("identity", {"model": "sha256:abc", "versions": {"torch": "x"}})
    for k in range(6):
        trial = study.ask()
        x = trial.suggest_float("x", 1e-7, 1e-3, log=True)
        trial.set_user_attr("results", {"lrs": [x, None]})
        trial.report(x * 1e3, 0)
        if k == 2:
            study.tell(trial, state=TrialState.FAIL)
        elif k == 4:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, -abs(x - 1e-5))
    return study


def frozen(study):
    return [(t.number, t.state, t.value, t.params, t.user_attrs, t.intermediate_values) for t in study.trials]


def test_saved_trials_rebuild_the_study_with_its_numbers(tmp_path):
    study = made_study(tmp_path)
    folder = tmp_path / "trials"
    assert trial_files.save_trials(study, folder) == 5  # complete and pruned; not the failed one
    assert sorted(p.name for p in folder.iterdir()) == [f"trial-{n:04d}.json" for n in (0, 1, 3, 4, 5)]
    assert trial_files.save_trials(study, folder) == 0  # each once
    fresh = optuna.create_study(storage=f"sqlite:///{tmp_path / 'b.db'}", study_name="s", direction="maximize")
    assert trial_files.add_saved_trials(fresh, folder, study.user_attrs["identity"]) == 5
    old, new = frozen(study), frozen(fresh)
    assert [t for t in new if t[1] != TrialState.FAIL] == [t for t in old if t[1] != TrialState.FAIL]
    assert [t[1] for t in new] == [t[1] for t in old]  # the failed number is kept as a failed trial
    assert fresh.best_trial.params == study.best_trial.params
    trial = fresh.ask()  # the sampler goes on from the rebuilt history
    assert trial.number == 6 and 1e-7 <= trial.suggest_float("x", 1e-7, 1e-3, log=True) <= 1e-3


def test_trial_files_are_checked_before_anything_is_added(tmp_path):
    study = made_study(tmp_path)
    folder = tmp_path / "trials"
    trial_files.save_trials(study, folder)
    with pytest.raises(ValueError, match="already holds trials"):  # never mixed into a live study
        trial_files.add_saved_trials(study, folder)
    fresh = optuna.create_study(study_name="s", direction="maximize")
    with pytest.raises(IdentityMismatch, match=r"trial-0000.json was made from something else: model"):
        trial_files.add_saved_trials(fresh, folder, {"model": "sha256:def", "versions": {"torch": "x"}})
    assert fresh.trials == []
    (folder / "trial-0003.json").write_text('{"number": 3, "sta')  # a truncated file
    with pytest.raises(Exception, match=r"trial-0003.json is not valid JSON") as err:
        trial_files.add_saved_trials(fresh, folder)
    assert "\n" not in str(err.value) and fresh.trials == []


def test_a_search_resumes_from_its_trial_files_alone(cli_search, minilm_path, glue_dir, tmp_path, capfd):
    """The session's one-trial search folder without its database: combine reads the trial files, and the
    same search command with --trials 2 takes trial 0 from them and runs only trial 1."""
    original = cli_search[0]
    assert (original / "trials" / "trial-0000.json").is_file()
    copy = tmp_path / "moved"
    shutil.copytree(original, copy, ignore=shutil.ignore_patterns("study.db*", ".search.lock"))
    assert json.loads((copy / "search.json").read_text())["storage"] == "study.db"  # not a machine path
    assert main(["combine", str(original), "--output", str(tmp_path / "a.json")]) == 0
    assert main(["combine", str(copy), "--output", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["lrs"] == json.loads((tmp_path / "b.json").read_text())["lrs"]
    capfd.readouterr()
    assert main(["search", "--model", str(minilm_path), "--data-dir", str(glue_dir), "--tasks", "rte,mrpc",
                 "--output", str(copy), "--trials", "2", "--pruner", "none", "--objective", "mean_accuracy",
                 *SMALL]) == 0
    assert "1 finished trial(s) of 'lrdist-rte-mrpc' taken from" in capfd.readouterr().err
    before = optuna.load_study(study_name="lrdist-rte-mrpc", storage=f"sqlite:///{original / 'study.db'}").trials[0]
    after = optuna.load_study(study_name="lrdist-rte-mrpc", storage=f"sqlite:///{copy / 'study.db'}").trials
    assert len(after) == 2 and all(t.state == TrialState.COMPLETE for t in after)
    assert (after[0].value, after[0].params, after[0].user_attrs) == (before.value, before.params, before.user_attrs)
    assert after[1].user_attrs["worker"]["pid"] != before.user_attrs["worker"]["pid"]  # trained here, now
    assert sorted(p.name for p in (copy / "trials").iterdir()) == ["trial-0000.json", "trial-0001.json"]


def test_tuning_resumes_from_its_trial_files(minilm_path, glue_dir, tmp_path):
    from dataclasses import replace

    from lrdist.continual import RECIPES
    from lrdist.tune import tune_baselines
    recipe = replace(RECIPES["fast"], max_train_samples=16, max_eval_samples=16, max_length=32)
    args = dict(methods=["flat"], data_dir=str(glue_dir), progress=False)
    tune_baselines(str(minilm_path), [["rte", "mrpc"]], recipe, 1, str(tmp_path), **args)
    saved = tmp_path / "trials" / "tune-flat" / "trial-0000.json"
    first = json.loads(saved.read_text())
    assert first["params"] == {"lr": recipe.lr} and first["user_attrs"]["runs"][0]["tasks"] == ["rte", "mrpc"]
    (tmp_path / "tune.db").unlink()  # another machine: only the files came along
    tune_baselines(str(minilm_path), [["rte", "mrpc"]], recipe, 2, str(tmp_path), **args)
    study = optuna.load_study(study_name="tune-flat", storage=f"sqlite:///{tmp_path / 'tune.db'}")
    assert [t.number for t in study.trials] == [0, 1]
    assert (study.trials[0].value, study.trials[0].params) == (first["value"], first["params"])
    assert json.loads(saved.read_text()) == first  # written once, never rewritten
    assert (tmp_path / "trials" / "tune-flat" / "trial-0001.json").is_file()
    with pytest.raises(IdentityMismatch, match=r"tune-flat/trial-0000.json was made from something else: recipe.max_length"):
        (tmp_path / "tune.db").unlink()
        tune_baselines(str(minilm_path), [["rte", "mrpc"]], replace(recipe, max_length=33), 3, str(tmp_path), **args)


def test_tuning_resumed_one_trial_per_call_draws_what_one_call_draws(minilm_path, glue_dir, tmp_path):
    """A tuning study continued one trial per call (as benchmarks/paper_question.py does), or after a kill
    mid-trial, draws the same knobs as one uninterrupted call, and no random draw comes twice: a sampler
    seeded once per call replayed its first draw on every resumed trial. A trial file lost to a kill is
    written on the next call; the best is taken over the trials asked for."""
    from dataclasses import replace

    from lrdist.continual import RECIPES
    from lrdist.tune import KNOBS, trial_sampler, tune_baselines
    recipe = replace(RECIPES["fast"], max_train_samples=16, max_eval_samples=16, max_length=32)
    args = dict(methods=["flat"], data_dir=str(glue_dir), progress=False)
    tune = lambda n, name: tune_baselines(str(minilm_path), [["rte", "mrpc"]], recipe, n, str(tmp_path / name), **args)  # noqa: E731
    tune(4, "one")
    for n in range(1, 5):
        if n == 3:  # killed while training trial 2: its knobs drawn and the trial RUNNING, nothing told
            study = optuna.load_study(study_name="tune-flat", storage=f"sqlite:///{tmp_path / 'split' / 'tune.db'}")
            study.sampler = trial_sampler("flat", recipe.seed, 2)
            KNOBS["flat"]["lr"](study.ask())
        tune(n, "split")
    lrs = {}
    for name in ("one", "split"):
        study = optuna.load_study(study_name="tune-flat", storage=f"sqlite:///{tmp_path / name / 'tune.db'}")
        lrs[name] = [t.params["lr"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert lrs["one"] == lrs["split"] and lrs["one"][0] == recipe.lr
    assert len(set(lrs["split"])) == 4, lrs
    # a trial told but killed before its file was written: the next call writes it
    trials = tmp_path / "one" / "trials" / "tune-flat"
    lost = json.loads((trials / "trial-0003.json").read_text())
    (trials / "trial-0003.json").unlink()
    best = tune(2, "one")  # nothing to train
    assert json.loads((trials / "trial-0003.json").read_text()) == lost
    first = [json.loads((trials / f"trial-000{k}.json").read_text()) for k in (0, 1)]
    assert best == {"flat": max(first, key=lambda r: r["value"])["params"]}


# ---- trial files against each other, search.json and the database (review 18) ------------------------------
def copy_search(cli_search, tmp_path, db: bool):
    folder = tmp_path / "copy"
    ignore = ["study.db*", ".search.lock"] if not db else [".search.lock"]
    shutil.copytree(cli_search[0], folder, ignore=shutil.ignore_patterns(*ignore))
    return folder


def one_error_line(capfd) -> str:
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def edit(path, change):
    rec = json.loads(path.read_text())
    change(rec)
    path.write_text(json.dumps(rec))


def test_combine_refuses_trial_files_of_another_study(cli_search, tmp_path, capfd):
    folder = copy_search(cli_search, tmp_path, db=False)
    foreign = folder / "trials" / "trial-0003.json"
    shutil.copy(folder / "trials" / "trial-0000.json", foreign)

    def other(rec):
        rec.update(number=3)
        rec["study_identity"]["model"] = "sha256:" + "0" * 64
    edit(foreign, other)
    capfd.readouterr()
    assert main(["combine", str(folder), "--output", str(tmp_path / "c.json")]) == 2
    line = one_error_line(capfd)
    assert "trial-0003.json was made from something else: model" in line, line
    assert main(["report", str(folder), "--output", str(tmp_path / "r")]) == 2
    assert "trial-0003.json was made from something else: model" in one_error_line(capfd)
    assert not (tmp_path / "c.json").exists()


def test_a_database_and_trial_files_that_disagree_are_refused(cli_search, tmp_path, capfd):
    folder = copy_search(cli_search, tmp_path, db=True)
    assert main(["combine", str(folder), "--output", str(tmp_path / "ok.json")]) == 0  # they agree
    def other_value(rec):  # a trial file consistent in itself (its value is its results'), not the database's
        rec["value"] = rec["user_attrs"]["results"]["mean_final_accuracy"] = 0.123
    edit(folder / "trials" / "trial-0000.json", other_value)
    capfd.readouterr()
    assert main(["combine", str(folder), "--output", str(tmp_path / "c.json")]) == 2
    line = one_error_line(capfd)
    assert line.startswith("lrdist combine: error: trial 0: ") and "trial-0000.json disagrees with" in line, line
    assert "value" in line and "move" in line and "study.db" in line
    original = json.loads((cli_search[0] / "trials" / "trial-0000.json").read_text())
    edit(folder / "trials" / "trial-0000.json", lambda rec: rec.update(original))
    shutil.copy(folder / "trials" / "trial-0000.json", folder / "trials" / "trial-0001.json")
    edit(folder / "trials" / "trial-0001.json", lambda rec: rec.update(number=1))  # a trial the db lacks
    assert main(["report", str(folder), "--output", str(tmp_path / "r")]) == 2
    assert "trial 1: " in (line := one_error_line(capfd)) and "the study has no such trial" in line, line
    # save_trials never leaves a file beside the database that says otherwise
    study = optuna.load_study(study_name="lrdist-rte-mrpc", storage=f"sqlite:///{folder / 'study.db'}")
    edit(folder / "trials" / "trial-0000.json", lambda rec: rec.update(value=0.5))
    with pytest.raises(IdentityMismatch, match="trial 0: .*trial-0000.json disagrees with study 'lrdist-rte-mrpc'"):
        trial_files.save_trials(study, folder / "trials")


def test_a_search_json_that_disagrees_with_the_database_is_refused(cli_search, tmp_path, capfd):
    """search.json says what the folder's study was made from: one whose identity is not the database
    study's is refused, as it is once the database is gone and the trial files are compared with it."""
    folder = copy_search(cli_search, tmp_path, db=True)

    def lr(info):
        info["identity"]["recipe"]["lr"] = 1e-3
    edit(folder / "search.json", lr)
    for argv in (["combine", str(folder), "--output", str(tmp_path / "c.json")],
                 ["report", str(folder), "--output", str(tmp_path / "r")]):
        capfd.readouterr()
        assert main(argv) == 2
        line = one_error_line(capfd)
        assert "search.json (beside the study in sqlite:///" in line and "recipe.lr: 0.001 then, 0.0002 now" in line, line
    assert not (tmp_path / "c.json").exists()


def test_a_refused_search_leaves_no_database_behind(cli_search, minilm_path, glue_dir, tmp_path, capfd):
    folder = copy_search(cli_search, tmp_path, db=False)
    capfd.readouterr()
    assert main(["search", "--model", str(minilm_path), "--data-dir", str(glue_dir), "--tasks", "rte,mrpc",
                 "--output", str(folder), "--trials", "2", "--pruner", "none", "--objective", "mean_accuracy",
                 *SMALL, "--max-length", "33"]) == 2
    assert "trial-0000.json was made from something else: recipe.max_length" in one_error_line(capfd)
    assert not (folder / "study.db").exists()
    assert main(["combine", str(folder), "--output", str(tmp_path / "c.json")]) == 0  # the files still serve
    optuna.create_study(storage=f"sqlite:///{folder / 'study.db'}", study_name="other")  # a db without this study
    assert main(["combine", str(folder), "--output", str(tmp_path / "d.json")]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["lrs"] == json.loads((tmp_path / "c.json").read_text())["lrs"]


def test_combine_refuses_studies_of_other_recipes_and_records_identities(cli_search, tmp_path, capfd):
    folder = copy_search(cli_search, tmp_path, db=False)
    other = tmp_path / "other"
    shutil.copytree(folder, other)

    def lr(ident):
        ident["recipe"]["lr"] = 1e-3
    edit(other / "search.json", lambda info: lr(info["identity"]))
    for path in (other / "trials").glob("trial-*.json"):
        edit(path, lambda rec: lr(rec["study_identity"]))
    assert main(["combine", str(folder), "--output", str(tmp_path / "c.json")]) == 0
    made = json.loads((tmp_path / "c.json").read_text())
    assert made["studies"][0]["identity"] == json.loads((folder / "search.json").read_text())["identity"]
    capfd.readouterr()
    assert main(["combine", str(folder), str(other), "--output", str(tmp_path / "d.json")]) == 2
    line = one_error_line(capfd)
    assert "were made from different things (recipe.lr: 0.0002 then, 0.001 now)" in line, line


def break_trial(key):
    """Edits of a trial file by hand, each a problem a reader must name (file and field)."""
    def change(rec):
        if key == "value":
            rec["value"] = "abc"
        elif key == "distributions.lr_0":
            rec["distributions"]["lr_0"] = 5
        elif key == "intermediate_values":
            rec["intermediate_values"] = None
        elif key == "user_attrs.results.lrs":
            rec["user_attrs"]["results"]["lrs"] = [1e-5]  # one region of ten
        elif key == "user_attrs":
            del rec["user_attrs"]
        elif key == "number":
            rec["number"] = 300000
        elif key == "value null":
            rec["value"] = None
        elif key == "value huge":
            rec["value"] = 1e300
        elif key == "value other":  # the objective (mean_accuracy) lies in [0, 1]; not this trial's results'
            rec["value"] = 0.0 if rec["value"] > 0.25 else 0.9
        elif key == "objective huge":
            rec["user_attrs"]["results"]["objective"] = 1e300
        elif key == "lrs huge":
            rec["user_attrs"]["results"]["lrs"][0] = 1e10
        elif key == "lrs in an empty region":  # the model has 6 layers: bert10's regions 4 and 8 are empty
            rec["user_attrs"]["results"]["lrs"][4] = 1e-5
        elif key == "lrs null in a searched region":
            rec["user_attrs"]["results"]["lrs"][0] = None
        elif key == "lrs other than the params":
            rec["user_attrs"]["results"]["lrs"][1] = rec["params"]["lr_1"] * 1.5
        elif key == "param abc":
            rec["params"]["lr_0"] = "abc"
        elif key == "param null":
            rec["params"]["lr_0"] = None
        elif key == "results missing":
            del rec["user_attrs"]["results"]
        elif key == "intermediate value huge":  # Hyperband would judge the trial by it
            rec["intermediate_values"]["0"] = 1e300
    return change


@pytest.mark.parametrize("key,field", [("value", "value"), ("distributions.lr_0", "distributions.lr_0"),
                                       ("intermediate_values", "intermediate_values"),
                                       ("user_attrs.results.lrs", "user_attrs.results.lrs"),
                                       ("user_attrs", "user_attrs"), ("number", "number"), ("value null", "value"),
                                       ("value huge", "value"), ("value other", "value"),
                                       ("objective huge", "user_attrs.results.objective"),
                                       ("lrs huge", "user_attrs.results.lrs.0"),
                                       ("lrs in an empty region", "user_attrs.results.lrs.4"),
                                       ("lrs null in a searched region", "user_attrs.results.lrs.0"),
                                       ("lrs other than the params", "user_attrs.results.lrs.1"),
                                       ("param abc", "params.lr_0"), ("param null", "params.lr_0"),
                                       ("results missing", "user_attrs.results"),
                                       ("intermediate value huge", "intermediate_values.0")])
def test_a_hand_edited_trial_file_is_named_in_one_line(cli_search, tmp_path, key, field, capfd):
    folder = copy_search(cli_search, tmp_path, db=False)
    edit(folder / "trials" / "trial-0000.json", break_trial(key))
    capfd.readouterr()
    assert main(["combine", str(folder), "--output", str(tmp_path / "c.json")]) == 2
    line = one_error_line(capfd)
    assert f"trial-0000.json: field {field} " in line, line


@pytest.mark.parametrize("content,field", [("[]", "(the whole file)"), ('{"storage": "study.db"}', "study_name")])
def test_a_hand_edited_search_json_is_named_in_one_line(cli_search, tmp_path, content, field, capfd):
    folder = copy_search(cli_search, tmp_path, db=False)
    (folder / "search.json").write_text(content)
    for argv in (["combine", str(folder), "--output", str(tmp_path / "c.json")],
                 ["report", str(folder), "--output", str(tmp_path / "r")]):
        capfd.readouterr()
        assert main(argv) == 2
        assert f"search.json: field {field} " in one_error_line(capfd)


def hyperband_study(storage: str):
    pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=6, reduction_factor=3)
    return optuna.create_study(storage=storage, study_name="hb", direction="maximize", pruner=pruner,
                               sampler=optuna.samplers.RandomSampler(seed=0))


def hopeless_steps(study) -> int | None:
    """The step at which a trial reporting a very low curve is pruned (None: it runs to the end)."""
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    for step in range(6):
        trial.report(-10.0 + step * 1e-3, step)
        if trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return step
    study.tell(trial, -10.0)
    return None


def test_a_hyperband_study_rebuilt_from_files_prunes_as_the_original(tmp_path):
    """The pruner's history (Hyperband's completed_rung_N in system_attrs) and the times come back."""
    study = hyperband_study(f"sqlite:///{tmp_path / 'a.db'}")

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        for step in range(6):
            trial.report(x * (step + 1) / 6, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        trial.set_user_attr("results", {"lrs": [1e-5]})  # a complete trial records its results
        return x
    study.optimize(objective, n_trials=20)
    trial_files.save_trials(study, tmp_path / "trials")
    rebuilt = hyperband_study(f"sqlite:///{tmp_path / 'b.db'}")
    trial_files.add_saved_trials(rebuilt, tmp_path / "trials")
    old, new = study.trials, rebuilt.trials
    assert [(t.system_attrs, t.datetime_start, t.datetime_complete) for t in new] == \
           [(t.system_attrs, t.datetime_start, t.datetime_complete) for t in old]
    assert any(k.startswith("completed_rung_") for t in new for k in t.system_attrs)
    steps = [hopeless_steps(study) for _ in range(4)]
    assert steps == [hopeless_steps(rebuilt) for _ in range(4)] and any(s is not None for s in steps)


def as_before(ident: dict) -> dict:
    """An identity as lrdist wrote it before the device, precision, sampler and pruner were recorded."""
    return {k: v for k, v in ident.items() if k not in ("device", "precision", "sampler", "pruner")}


def test_a_search_written_before_the_new_identity_fields_resumes_and_combines(cli_search, minilm_path, glue_dir,
                                                                              tmp_path, capfd):
    """search.json, trial files and study.db in the earlier format (as a search still running on the earlier
    code writes them): resumed, combined and reported; a genuine mismatch is still refused."""
    folder = copy_search(cli_search, tmp_path, db=True)
    edit(folder / "search.json", lambda info: info.update(identity=as_before(info["identity"])))
    for path in (folder / "trials").glob("trial-*.json"):
        edit(path, lambda rec: rec.update(study_identity=as_before(rec["study_identity"])))
    study = optuna.load_study(study_name="lrdist-rte-mrpc", storage=f"sqlite:///{folder / 'study.db'}")
    study.set_user_attr("identity", as_before(study.user_attrs["identity"]))
    argv = ["search", "--model", str(minilm_path), "--data-dir", str(glue_dir), "--tasks", "rte,mrpc", "--output",
            str(folder), "--trials", "1", "--pruner", "none", "--objective", "mean_accuracy", *SMALL]
    assert main(argv) == 0  # its one trial is done: accepted, nothing trained
    assert len(optuna.load_study(study_name="lrdist-rte-mrpc", storage=f"sqlite:///{folder / 'study.db'}").trials) == 1
    assert main(["combine", str(folder), "--output", str(tmp_path / "c.json")]) == 0
    (folder / "study.db").unlink()  # from the files alone, against the search.json the search rewrote
    assert main(["combine", str(folder), "--output", str(tmp_path / "d.json")]) == 0
    capfd.readouterr()
    assert main([*argv, "--max-length", "33"]) == 2
    assert "trial-0000.json was made from something else: recipe.max_length" in one_error_line(capfd)
