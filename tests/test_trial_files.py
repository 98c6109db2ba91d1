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
