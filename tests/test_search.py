"""Real Optuna studies on real storage (SQLite, journal file), with real tiny trials of MiniLM."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from lrdist.combine import combine, combine_sources
from lrdist.continual import Recipe
from lrdist.report import make_report
from lrdist.search import SearchConfig, SearchSpace, make_storage, search

TINY = Recipe(epochs=1, batch_size=8, max_length=32, max_train_samples=16, max_eval_samples=16)


def config(tmp_path, minilm_path, glue_dir, **kw):
    kw.setdefault("trials", 3)
    return SearchConfig(model=str(minilm_path), tasks=["rte", "mrpc"], recipe=TINY, data_dir=str(glue_dir),
                        output=str(tmp_path), progress=False, **kw)


def cli_args(tmp_path, minilm_path, glue_dir, trials, *extra):
    return [sys.executable, "-m", "lrdist.cli", "search", "--model", str(minilm_path), "--data-dir", str(glue_dir),
            "--tasks", "rte,mrpc",
            "--output", str(tmp_path), "--trials", str(trials), "--max-train-samples", "16",
            "--max-eval-samples", "16", "--max-length", "32", "--no-progress", *extra]


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_three_trials_first_is_flat_and_all_carry_results(tmp_path, minilm_path, glue_dir, storage):
    url = None if storage == "sqlite" else f"journal:{tmp_path / 'study.log'}"
    study = search(config(tmp_path, minilm_path, glue_dir, storage=url, pruner="none"))
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 3
    first = min(trials, key=lambda t: t.number)
    assert first.number == 0 and set(first.params.values()) == {TINY.lr}  # the flat baseline at the recipe's LR
    for t in trials:
        res = t.user_attrs["results"]
        # one LR per region; MiniLM's empty bert10 regions (4 and 8) are no search dimension and None
        assert res["lrs"] == [t.params.get(f"lr_{r}") for r in range(10)]
        assert "lr_4" not in t.params and "lr_8" not in t.params
        assert t.value == pytest.approx(res["accuracy_matrix"][1][0] + res["accuracy_matrix"][1][1])
    if storage == "sqlite":
        assert (tmp_path / "study.db").is_file()
    # running the same search again resumes: nothing new to do, nothing lost
    again = search(config(tmp_path, minilm_path, glue_dir, storage=url, pruner="none"))
    assert [t.value for t in again.get_trials(states=(TrialState.COMPLETE,))] == [t.value for t in trials]


@pytest.mark.parametrize("batch", [1, pytest.param(2, marks=pytest.mark.slow)],  # batched: 30 s more of CI
                         ids=["one-at-a-time", "batch-trials-2"])
def test_kill_9_mid_trial_then_resume_keeps_completed_trials(tmp_path, minilm_path, glue_dir, batch):
    """kill -9 while a trial (or a batch of K trials trained together) runs; the same command resumes:
    completed trials intact, each killed trial marked failed and re-queued with its LRs, exactly N complete."""
    n = 2 * batch + 1
    args = cli_args(tmp_path, minilm_path, glue_dir, n, "--pruner", "none", "--batch-trials", str(batch))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    deadline = time.time() + 300
    snapshot = None
    while time.time() < deadline:
        time.sleep(0.5)
        try:  # the search may not have made the study yet, or may hold the file's lock a moment
            study = optuna.load_study(study_name="lrdist-rte-mrpc", storage=storage)
            done = study.get_trials(states=(TrialState.COMPLETE,))
            running = study.get_trials(states=(TrialState.RUNNING,))
        except Exception:
            continue
        if len(done) >= batch and running and "worker" in running[0].user_attrs:
            snapshot = {t.number: (t.value, t.user_attrs["results"]) for t in done}
            os.killpg(proc.pid, signal.SIGKILL)  # mid-trial
            break
    proc.wait(timeout=30)
    assert snapshot, "the search never reached its second round of trials"
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    study = optuna.load_study(study_name="lrdist-rte-mrpc", storage=storage)
    complete = {t.number: (t.value, t.user_attrs["results"]) for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(complete) == n and len(study.trials) == n + len(study.get_trials(states=(TrialState.FAIL,)))
    for number, kept in snapshot.items():
        assert complete[number] == kept  # every completed trial intact
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert 1 <= len(failed) <= batch  # the killed trials, marked, and each re-queued with its LRs
    for f in failed:
        retried = [t for t in study.trials if t.user_attrs.get("retry_of") == f.number]
        assert len(retried) == 1 and f.params.items() <= retried[0].params.items()
        assert retried[0].state == TrialState.COMPLETE


def test_two_workers_share_one_study(tmp_path, minilm_path, glue_dir):
    cfg = config(tmp_path, minilm_path, glue_dir, trials=4, workers=2, pruner="none")
    study = search(cfg)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4 and len(study.trials) == 4  # none lost, none extra
    assert len({t.number for t in complete}) == 4
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == 4  # no duplicate trials: the workers sample with different seeds


def test_the_same_command_twice_shares_one_study(tmp_path, minilm_path, glue_dir):
    """Two processes started alike (as on two machines) on one storage: N trials, each once."""
    args = cli_args(tmp_path, minilm_path, glue_dir, 8, "--pruner", "none", "--seed", "0")
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]  # files: a full pipe would stall a worker
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two processes on a 2-core machine: one thread each
    procs = [subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env) for log in logs]
    for p, log in zip(procs, logs):
        assert p.wait(timeout=600) == 0, open(log.name).read()[-3000:]
    study = optuna.load_study(study_name="lrdist-rte-mrpc", storage=f"sqlite:///{tmp_path / 'study.db'}")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 8 and len(study.trials) == 8
    assert all("results" in t.user_attrs for t in complete)
    assert len({t.user_attrs["worker"]["pid"] for t in complete}) == 2  # both took trials


def test_combine_is_the_geometric_mean_of_the_chosen_trials(tmp_path, minilm_path, glue_dir):
    search(config(tmp_path / "a", minilm_path, glue_dir, pruner="none"))
    search(config(tmp_path / "b", minilm_path, glue_dir, pruner="none", seed=5, study_name="other"))
    out = tmp_path / "combined.json"
    res = combine_sources([str(tmp_path / "a"), str(tmp_path / "b")], str(out), top_k=2)
    chosen = []
    for folder, name in (("a", "lrdist-rte-mrpc"), ("b", "other")):
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / folder / 'study.db'}")
        best = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: -t.value)[:2]
        chosen += [[t.params.get(f"lr_{r}") for r in range(10)] for t in best]
    active = [r for r in range(10) if r not in (4, 8)]
    expected = np.exp(np.log(np.array([[c[r] for r in active] for c in chosen])).mean(axis=0))
    np.testing.assert_allclose([res["lrs"][r] for r in active], expected, rtol=1e-12)
    assert res["lrs"][4] is None and res["lrs"][8] is None
    assert json.loads(out.read_text())["lrs"] == res["lrs"]
    np.testing.assert_allclose([combine(chosen, "median")[r] for r in active],
                               np.median([[c[r] for r in active] for c in chosen], axis=0))
    with pytest.raises(ValueError, match="fewer than top-k"):
        combine_sources([str(tmp_path / "a")], str(out), top_k=5)

    report = make_report([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "report"), str(out))
    text = report.read_text()
    assert "distributions.png" in text and "history.png" in text and "| LR |" in text
    for png in ("distributions.png", "history.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_pruning_gets_a_value_every_epoch_and_keeps_finished_work(tmp_path, minilm_path, glue_dir):
    study = search(config(tmp_path, minilm_path, glue_dir, trials=4, pruner="median", seed=3))
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 4
    assert all(t.intermediate_values for t in finished)  # a value after every epoch
    assert all(0 in t.intermediate_values for t in finished)
    last = TINY.epochs * 2 - 1  # a trial that reached its last report is complete, never pruned
    assert all(last not in t.intermediate_values for t in finished if t.state == TrialState.PRUNED)


def test_bad_input(tmp_path, minilm_path, glue_dir):
    search(config(tmp_path, minilm_path, glue_dir, trials=1, pruner="none"))
    with pytest.raises(ValueError, match="made from something else: space.low: 1e-07 then, 1e-06 now"):
        search(config(tmp_path, minilm_path, glue_dir, trials=1, space=SearchSpace(low=1e-6)))
    with pytest.raises(ValueError, match="cannot open the study storage"):
        make_storage("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(ValueError, match="unknown objective"):
        config(tmp_path, minilm_path, glue_dir, objective="speed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no search.json"):
        combine_sources([str(tmp_path / "empty")], str(tmp_path / "x.json"))
    with pytest.raises(FileNotFoundError, match="neither a search folder nor a storage URL"):
        combine_sources([str(tmp_path / "nothing-here")], str(tmp_path / "x.json"))


def test_evaluate_and_the_full_report(tmp_path, minilm_path, glue_dir):
    from lrdist.evaluate import evaluate
    search(config(tmp_path / "s", minilm_path, glue_dir, trials=2, pruner="none"))
    combine_sources([str(tmp_path / "s")], str(tmp_path / "combined.json"), top_k=2)
    res = evaluate(str(minilm_path), [["sst2", "cola"]], TINY, [0, 1], str(tmp_path / "eval"),
                   methods=["flat", "combined", "paper", "ewc", "migu", "llrd"],
                   combined=str(tmp_path / "combined.json"), data_dir=str(glue_dir), progress=False)
    rows = {r["method"]: r for r in res["summary"]}
    assert set(rows) == {"flat", "combined", "paper", "ewc", "migu", "llrd"}
    for label, row in rows.items():
        runs = [r for r in res["runs"] if r["method"] == label]
        assert row["runs"] == 2 and row["objective"] == pytest.approx(np.mean([r["objective"] for r in runs]))
        assert row["objective_std"] == pytest.approx(np.std([r["objective"] for r in runs], ddof=1))
        if label != "flat":  # paired with flat on the same (sequence, seed): mean difference and t interval
            flat = {r["seed"]: r["objective"] for r in res["runs"] if r["method"] == "flat"}
            diffs = np.array([r["objective"] - flat[r["seed"]] for r in runs])
            half = 12.7062 * diffs.std(ddof=1) / np.sqrt(2)  # t(1 df, 97.5%)
            d = row["objective_vs_flat"]
            assert d["mean"] == pytest.approx(diffs.mean()) and d["n"] == 2
            assert d["high"] - d["low"] == pytest.approx(2 * half, rel=1e-4, abs=1e-12)
    combined = json.loads((tmp_path / "combined.json").read_text())["lrs"]
    assert [r for r in res["runs"] if r["method"] == "combined"][0]["lrs"] == combined
    # run again: every finished run is kept and nothing is retrained (no data or model is even loaded)
    (last,) = (tmp_path / "eval" / "runs").glob("sst2-cola-migu-seed1-*.json")  # (named by the method's settings)
    last.unlink()  # as if stopped before the last
    again = evaluate(str(minilm_path), [["sst2", "cola"]], TINY, [0, 1], str(tmp_path / "eval"),
                     methods=["flat", "combined", "paper", "ewc", "migu", "llrd"],
                     combined=str(tmp_path / "combined.json"), data_dir=str(glue_dir), progress=False)
    assert again["summary"] == res["summary"]
    report = make_report([str(tmp_path / "s")], str(tmp_path / "r"), str(tmp_path / "combined.json"),
                         str(tmp_path / "eval" / "evaluate.json"))
    assert "| flat |" in report.read_text() and (tmp_path / "r" / "methods.png").stat().st_size > 10_000


@pytest.mark.parametrize("command", ["search", "evaluate"])
def test_a_cuda_device_this_machine_lacks_is_refused_before_anything_starts(tmp_path, minilm_path, glue_dir,
                                                                             capsys, command):
    import torch
    from lrdist.cli import main
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    out = tmp_path / "out"
    code = main([command, "--device", "cuda", "--model", str(minilm_path), "--data-dir", str(glue_dir),
                 "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no CUDA device" in err and "--device cpu" in err
    assert not out.exists()  # nothing started, nothing written
    bad = main(["search", "--heartbeat-interval", "10", "--grace-period", "5", "--output", str(out)])
    err = capsys.readouterr().err
    assert bad == 2 and err.count("\n") == 1 and "--grace-period 5 must be longer than --heartbeat-interval 10" in err
    assert main(["search", "--heartbeat-interval", "0", "--output", str(out)]) == 2
    assert "--heartbeat-interval: must be 1 or more, got 0" in capsys.readouterr().err and not out.exists()


def test_a_storage_holding_another_study_leaves_no_run_folder(tmp_path, minilm_path, glue_dir):
    """--storage shared by runs: a study of another task sequence under the same name is refused before
    anything is written, and the new --output folder is not left behind (empty, with a lock file)."""
    from lrdist.search import open_study
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    open_study(config(tmp_path / "first", minilm_path, glue_dir, storage=url, study_name="shared"), seed=0)
    other = SearchConfig(model=str(minilm_path), tasks=["mrpc", "rte"], recipe=TINY, data_dir=str(glue_dir),
                         output=str(tmp_path / "second"), progress=False, storage=url, study_name="shared")
    with pytest.raises(ValueError, match=r"made from something else: tasks: \[.rte., .mrpc.\] then"):
        search(other)
    assert not (tmp_path / "second").exists()
