"""The `lrdist` command line: help, --version, --debug, the error boundary, checkpoints, progress, plots."""
import argparse
import json
import re

import optuna
import pytest
import sqlalchemy.exc
import torch

from conftest import REPO
from lrdist.cli import build_parser, evaluate_methods, expected, guarded, main, one_line
from lrdist.evaluate import DEFAULT_METHODS


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_version_is_the_package_version(capsys):
    assert main(["--version"]) == 0
    declared = re.search(r'version="([^"]+)"', (REPO / "setup.py").read_text()).group(1)
    assert capsys.readouterr().out.strip() == f"lrdist {declared}"


def test_help_describes_every_command_and_option():
    parser, commands = subparsers()
    assert "parses, calls one function" not in parser.format_help()
    for name, p in commands.items():
        assert p.description and len(p.description) > 40, name
        text = "".join(p.format_help().split())  # (wrapping may break a default at a hyphen)
        for action in p._actions:
            if action.option_strings == ["-h", "--help"]:
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                assert "default:" in action.help or f"(default:{action.default})".replace(" ", "") in text, \
                    f"{name} {action.option_strings[0]} shows no default"


def test_evaluate_methods_help_lists_exactly_what_is_accepted():
    _, commands = subparsers()
    help_text = next(a.help for a in commands["evaluate"]._actions if "--methods" in a.option_strings)
    for method in DEFAULT_METHODS:
        assert method in help_text
        assert evaluate_methods(method, combined="combined.json") == [method]
    assert evaluate_methods(None, combined=None) == [m for m in DEFAULT_METHODS if m != "combined"]
    with pytest.raises(ValueError, match="unknown 'dist'"):
        evaluate_methods("dist", combined=None)


@pytest.mark.parametrize("how", ["--debug first", "--debug after the command", "LRDIST_DEBUG=1"])
def test_debug_adds_the_traceback(how, tmp_path, monkeypatch, capfd):
    argv = ["evaluate", "--seeds", "0,x", "--output", str(tmp_path / "e")]
    if how == "--debug first":
        argv = ["--debug"] + argv
    elif how == "--debug after the command":
        argv = argv + ["--debug"]
    else:
        monkeypatch.setenv("LRDIST_DEBUG", "1")
    assert main(argv) == 2
    err = capfd.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1] == "lrdist evaluate: error: --seeds '0,x': 'x' is not a whole number; give comma-separated " \
                      "seeds such as 0,1,2"
    assert not (tmp_path / "e").exists()


def divide_by_zero(args):
    return 1 // 0


def test_a_bug_is_one_line_with_a_hint_and_exit_1(capfd):
    assert guarded(divide_by_zero, argparse.Namespace(), "lrdist x") == 1
    assert capfd.readouterr().err == ("lrdist x: internal error: ZeroDivisionError: integer division or modulo by "
                                      "zero (rerun with --debug for the traceback)\n")
    assert guarded(divide_by_zero, argparse.Namespace(), "lrdist x", debug=True) == 1
    err = capfd.readouterr().err
    assert err.startswith("Traceback") and "1 // 0" in err and err.count("\n") > 3


def test_expected_failures_and_their_one_line():
    for exc in (ValueError("a"), FileNotFoundError(2, "No such file"), PermissionError(13, "denied"),
                KeyError("k"), RuntimeError("r"), optuna.exceptions.StorageInternalError("commit failed"),
                sqlalchemy.exc.DatabaseError("SELECT 1", {}, Exception("database disk image is malformed"))):
        assert expected(exc), exc
    for exc in (ZeroDivisionError(), IndexError("i"), TypeError("t"), AttributeError("a")):
        assert not expected(exc), exc
    assert one_line(ValueError("first\nsecond")) == "first"
    assert one_line(KeyError("study")) == "'study'"
    assert one_line(optuna.exceptions.StorageInternalError("commit failed")) == "StorageInternalError: commit failed"
    assert one_line(ValueError()) == "ValueError"


def test_finished_runs_drop_the_checkpoint_unless_kept(tmp_path, minilm_path, glue_dir, capfd):
    from transformers.utils import logging as hf_logging
    hf_logging.enable_progress_bar()  # (another test may have run a command with --no-progress)
    base = ["finetune", "--model", str(minilm_path), "--data-dir", str(glue_dir), "--tasks", "rte,mrpc",
            "--max-train-samples", "8",
            "--max-eval-samples", "8", "--max-length", "32"]
    out = tmp_path / "run"
    # with bars: the loading bar and the task's bar with its epoch
    assert main(base + ["--output", str(out), "--stop-after", "1"]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" in err and "task 1/2 rte" in err and "epoch=1/1" in err
    assert (out / "checkpoint.pt").is_file() and not (out / "results.json").exists()
    # an unfinished run is never restarted by accident
    assert main(base + ["--output", str(out), "--no-progress"]) == 2
    assert "holds an unfinished run" in capfd.readouterr().err
    assert (out / "checkpoint.pt").is_file()
    # --resume finishes it; the results stay and the checkpoint goes. --no-progress: no bar at all
    assert main(base + ["--output", str(out), "--resume", "--no-progress"]) == 0
    assert capfd.readouterr().err == ""
    results = json.loads((out / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 2 and not (out / "checkpoint.pt").exists()
    # --keep-checkpoint keeps it, holding the finished run
    kept = tmp_path / "kept"
    assert main(base + ["--output", str(kept), "--keep-checkpoint", "--no-progress"]) == 0
    ckpt = torch.load(kept / "checkpoint.pt", weights_only=False)
    assert ckpt["next_task"] == 2
    assert ckpt["acc"][-1] == json.loads((kept / "results.json").read_text())["accuracy_matrix"][-1]


def test_search_progress_shows_the_running_trial(cli_search):
    _, err = cli_search
    for shown in ("search lrdist-rte-mrpc", "running trial 0", "task 1/2 rte", "task 2/2 mrpc", "epoch=1/1"):
        assert shown in err, shown


def test_history_plot_names_the_objective_used_and_counts_whole_trials(cli_search, tmp_path):
    from lrdist.combine import open_studies
    from lrdist.report import plot_history
    ax = plot_history(open_studies(str(cli_search[0])), tmp_path / "history.png")
    assert ax.get_ylabel() == "objective: mean final accuracy"  # the search ran with --objective mean_accuracy
    ticks = list(ax.get_xticks())
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_write_left_unfinished_by_kill_9_is_rolled_back_not_called_damage(cli_search, tmp_path):
    """A process killed mid-write leaves a hot journal beside the study. The next command rolls it back (as
    SQLite does for any writer) and carries on; it must not mistake the journal for a damaged database."""
    import shutil
    import subprocess
    import sys
    folder = tmp_path / "study"
    shutil.copytree(cli_search[0], folder)
    meta = folder / "search.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "storage": f"sqlite:///{folder / 'study.db'}"}))
    db = folder / "study.db"
    before = optuna.load_study(study_name="lrdist-rte-mrpc", storage=f"sqlite:///{db}").trials
    writer = ("import os, sqlite3, sys\n"
              "con = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "con.execute('PRAGMA cache_size=2')\n"  # a tiny cache spills pages to the file mid-transaction
              "con.execute('BEGIN')\n"
              "for _ in range(200): con.execute('INSERT INTO trial_user_attributes (trial_id, key, value_json) "
              "VALUES (1, hex(randomblob(8)), hex(randomblob(2000)))')\n"
              "os._exit(9)\n")  # no commit, no rollback: as kill -9 would leave it
    subprocess.run([sys.executable, "-c", writer, str(db)], check=False)
    assert (folder / "study.db-journal").stat().st_size > 0
    assert main(["report", str(folder), "--output", str(tmp_path / "report")]) == 0
    assert not (folder / "study.db-journal").exists()
    after = optuna.load_study(study_name="lrdist-rte-mrpc", storage=f"sqlite:///{db}").trials
    assert [(t.number, t.value, t.params, t.user_attrs) for t in after] == \
           [(t.number, t.value, t.params, t.user_attrs) for t in before]
