"""Every bad input we know of, run through the real `lrdist` command line: exit code 2, exactly one line on
stderr naming the problem, and nothing created or changed on disk (no folder, no database, no results)."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from conftest import REPO
from lrdist.cli import main

NO_GPU = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
TEN = ",".join(["1e-5"] * 9)  # nine positive values; rows add a tenth


def damage(db) -> None:
    """Overwrite one page in the middle of a SQLite file, as a bad disk sector would."""
    con = sqlite3.connect(db)
    size, pages = con.execute("PRAGMA page_size").fetchone()[0], con.execute("PRAGMA page_count").fetchone()[0]
    con.close()
    with open(db, "r+b") as f:
        f.seek(size * (pages // 2))
        f.write(b"\xde\xad\xbe\xef" * (size // 4))


@pytest.fixture
def ws(tmp_path, cli_search, monkeypatch):
    """A workspace of bad inputs; the command runs inside it, so default outputs (runs/...) land here too."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text('{"lrs": "1e-5"}')
    (tmp_path / "broken.json").write_text('{"lrs": [1e-5,')
    for name in ("held", "damaged"):  # copies of the search folder, each naming its own study.db
        shutil.copytree(cli_search[0], tmp_path / name)
        meta = tmp_path / name / "search.json"
        meta.write_text(json.dumps({**json.loads(meta.read_text()),
                                    "storage": f"sqlite:///{tmp_path / name / 'study.db'}"}))
    damage(tmp_path / "damaged" / "study.db")
    (tmp_path / "nameless").mkdir()
    (tmp_path / "nameless" / "search.json").write_text('{"study_name": "x"}')
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "checkpoint.pt").write_bytes(b"\0")  # a run stopped after a task
    (tmp_path / "finished").mkdir()
    (tmp_path / "finished" / "results.json").write_text("{}")  # a run that ended (its checkpoint dropped)
    (tmp_path / "evaldamaged" / "runs").mkdir(parents=True)  # an evaluate run cut short by a non-atomic writer
    (tmp_path / "evaldamaged" / "runs" / "rte-mrpc-flat-seed0.json").write_text('{"tasks": ["rte", "mrpc"], "obj')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tree(root) -> dict:
    """Every path under root with its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            out[path] = (st.st_size, st.st_mtime_ns)
    return out


def run_args(cmd, m, g, out):
    return [cmd, "--model", m, "--data-dir", g, "--output", out]


# (id, argv from (model, glue, workspace), a phrase the one line must hold)
ROWS = [
    # finetune: the model
    ("ft-model-not-cached-offline", lambda m, g, w: ["finetune", "--model", "no-such-org/x", "--data-dir", g,
                                                     "--output", f"{w}/o"], "not in the Hugging Face cache"),
    ("ft-model-not-a-hub-id", lambda m, g, w: ["finetune", "--model", "no such/x y", "--output", f"{w}/o"],
     "nor a valid hub id"),
    ("ft-model-empty-folder", lambda m, g, w: ["finetune", "--model", f"{w}/empty", "--output", f"{w}/o"],
     "holds no config.json"),
    ("ft-model-missing-folder", lambda m, g, w: ["finetune", "--model", f"{w}/nothing/here", "--output", f"{w}/o"],
     "no such model folder"),
    # finetune: numbers
    ("ft-batch-size-0", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--batch-size", "0"],
     "--batch-size: must be 1 or more"),
    ("ft-max-train-samples-negative", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--max-train-samples=-5"],
     "--max-train-samples: must be 0 or more"),
    ("ft-max-eval-samples-negative", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--max-eval-samples", "-1"],
     "--max-eval-samples: must be 0 or more"),
    ("ft-epochs-0", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--epochs", "0"], "--epochs: must be 1"),
    ("ft-epochs-word", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--epochs", "two"],
     "not a whole number"),
    ("ft-max-length-beyond-model", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--max-length", "100000"],
     "longer than the model's 512 positions"),
    ("ft-max-length-tiny", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--max-length", "2"],
     "--max-length: must be 8 or more"),
    ("ft-precision-fp8", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--precision", "fp8"],
     "invalid choice: 'fp8'"),
    ("ft-length-buckets-negative", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--length-buckets=-2"],
     "--length-buckets: must be 0 or more"),
    ("ft-lr-0", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--lr", "0"], "above 0"),
    ("ft-lr-nan", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--lr", "nan"], "above 0"),
    ("ft-seed-negative", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--seed", "-1"], "--seed: must be 0"),
    ("ft-stop-after-0", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--stop-after", "0"], "--stop-after"),
    # finetune: the distribution
    ("ft-lrs-json-malformed", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--method", "dist", "--lrs",
                                                                                       f"{w}/broken.json"],
     "broken.json is not valid JSON"),
    ("ft-lrs-json-string", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--method", "dist", "--lrs",
                                                                                    f"{w}/bad.json"],
     "'lrs' must be a list of numbers"),
    ("ft-lrs-json-missing", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--method", "dist", "--lrs",
                                                                                     f"{w}/none.json"],
     "does not exist"),
    ("ft-lrs-negative-spaced", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--method", "dist", "--lrs",
                                                                                        "-1e-5," + TEN],
     "positive finite numbers; bad at position(s) [0]"),
    ("ft-lrs-negative-equals", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--method", "dist",
                                                                                        "--lrs=-1e-5," + TEN],
     "positive finite numbers; bad at position(s) [0]"),
    ("ft-lrs-zero-last", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--method", "dist", "--lrs",
                                                                                  TEN + ",0"],
     "bad at position(s) [9]"),
    ("ft-lrs-words", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--method", "dist", "--lrs", "a,b"],
     "neither a preset"),
    ("ft-lrs-too-few", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--method", "dist", "--lrs", "1e-5,2e-5"],
     "has 2 values, but the region scheme has 10 regions"),
    ("ft-lrs-for-depth-scheme", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--method", "dist", "--lrs",
                                                                                         TEN + ",1e-5",
                                                                                         "--scheme", "depth:2"],
     "the region scheme has 4 regions"),
    ("ft-dist-without-lrs", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--method", "dist"], "needs --lrs"),
    ("ft-lrs-without-dist", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--lrs", "paper"],
     "only for --method dist"),
    # finetune: method settings
    ("ft-llrd-decay-0", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--method", "llrd", "--llrd-decay", "0"],
     "above 0"),
    ("ft-llrd-decay-above-1", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--method", "llrd",
                                                                                       "--llrd-decay", "1.5"],
     "LLRD decay must lie in (0, 1]"),
    ("ft-migu-threshold-1.5", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--method", "migu",
                                                                                       "--migu-threshold", "1.5"],
     "MIGU threshold must lie in [0, 1)"),
    ("ft-ewc-lambda-negative", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--method", "ewc",
                                                                                        "--ewc-lambda", "-1"],
     "EWC lambda must be a finite number >= 0"),
    ("ft-ewc-fisher-batches-0", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--ewc-fisher-batches", "0"],
     "--ewc-fisher-batches: must be 1"),
    # finetune: tasks, data, scheme, device
    ("ft-one-task", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--tasks", "rte"], "two or more tasks"),
    ("ft-unknown-task", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--tasks", "rte,sst3"],
     "unknown GLUE task 'sst3'"),
    ("ft-task-twice", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--tasks", "rte,rte"], "appears twice"),
    ("ft-data-dir-missing", lambda m, g, w: run_args("finetune", m, f"{w}/none", f"{w}/o"), "does not exist"),
    ("ft-data-dir-without-tasks", lambda m, g, w: run_args("finetune", m, f"{w}/empty", f"{w}/o"),
     "no folder for task 'sst2'"),
    ("ft-scheme-unknown", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--scheme", "bert11"],
     "unknown region scheme"),
    ("ft-scheme-depth-0", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--scheme", "depth:0"],
     "positive integer N"),
    pytest.param("ft-device-cuda-without-gpu", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") +
                 ["--device", "cuda"], "no CUDA device here", marks=NO_GPU),
    ("ft-device-unknown", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--device", "tpu9"], "not a device"),
    ("ft-recipe-unknown", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--recipe", "huge"],
     "invalid choice: 'huge'"),
    ("ft-unknown-flag", lambda m, g, w: run_args("finetune", m, g, f"{w}/o") + ["--bogus"],
     "unrecognized arguments: --bogus"),
    # finetune: the output folder
    ("ft-output-is-a-file", lambda m, g, w: run_args("finetune", m, g, f"{w}/bad.json"), "is a file, not a folder"),
    ("ft-output-under-a-file", lambda m, g, w: run_args("finetune", m, g, f"{w}/bad.json/run"),
     "is a file, so the folder cannot be made"),
    ("ft-output-holds-unfinished-run", lambda m, g, w: run_args("finetune", m, g, f"{w}/unfinished"),
     "holds an unfinished run (checkpoint.pt); add --resume"),
    ("ft-resume-finished-run", lambda m, g, w: run_args("finetune", m, g, f"{w}/finished") + ["--resume"],
     "holds a finished run and no checkpoint"),
    ("ft-output-holds-a-run-without-identity", lambda m, g, w: run_args("finetune", m, g, f"{w}/finished") +
     ["--tasks", "rte,mrpc"], "was made from something else: nothing recorded"),
    # search
    ("search-output-holds-another-study", lambda m, g, w: run_args("search", m, g, f"{w}/held") +
     ["--tasks", "cola,sst2"], "already holds the study 'lrdist-rte-mrpc' (tasks rte,mrpc)"),
    ("search-study-db-damaged", lambda m, g, w: run_args("search", m, g, f"{w}/damaged") + ["--tasks", "rte,mrpc"],
     "study database"),
    ("search-model-not-cached", lambda m, g, w: ["search", "--model", "no-such-org/x", "--data-dir", g,
                                                 "--output", f"{w}/s"], "not in the Hugging Face cache"),
    ("search-heartbeat-0", lambda m, g, w: run_args("search", m, g, f"{w}/s") + ["--heartbeat-interval", "0"],
     "--heartbeat-interval: must be 1"),
    ("search-grace-below-heartbeat", lambda m, g, w: run_args("search", m, g, f"{w}/s") + ["--grace-period", "10"],
     "--grace-period 10 must be longer than --heartbeat-interval 30"),
    ("search-low-0", lambda m, g, w: run_args("search", m, g, f"{w}/s") + ["--low", "0"], "--low: must be a finite"),
    ("search-low-above-high", lambda m, g, w: run_args("search", m, g, f"{w}/s") + ["--low", "1e-3", "--high", "1e-7"],
     "0 < low < high"),
    ("search-trials-0", lambda m, g, w: run_args("search", m, g, f"{w}/s") + ["--trials", "0"], "--trials: must be 1"),
    ("search-workers-0", lambda m, g, w: run_args("search", m, g, f"{w}/s") + ["--workers", "0"], "--workers: must be 1"),
    ("search-top-k-0", lambda m, g, w: run_args("search", m, g, f"{w}/s") + ["--top-k", "0"], "--top-k: must be 1"),
    ("search-storage-not-a-url", lambda m, g, w: run_args("search", m, g, f"{w}/s") + ["--storage", "my study"],
     "is not a storage URL"),
    ("search-storage-missing-folder-under-file", lambda m, g, w: run_args("search", m, g, f"{w}/s") +
     ["--storage", f"sqlite:///{w}/bad.json/study.db"], "cannot be made"),
    ("search-objective-unknown", lambda m, g, w: run_args("search", m, g, f"{w}/s") + ["--objective", "speed"],
     "invalid choice: 'speed'"),
    # combine
    ("combine-missing-sqlite", lambda m, g, w: ["combine", f"sqlite:///{w}/missing.db", "--output", f"{w}/c.json"],
     "no database file"),
    ("combine-missing-sqlite-folder", lambda m, g, w: ["combine", f"sqlite:///{w}/nodir/missing.db", "--output",
                                                       f"{w}/c.json"], "no database file"),
    ("combine-missing-journal", lambda m, g, w: ["combine", f"journal:{w}/missing.log", "--output", f"{w}/c.json"],
     "no journal file"),
    ("combine-folder-without-search", lambda m, g, w: ["combine", f"{w}/empty", "--output", f"{w}/c.json"],
     "holds no search.json"),
    ("combine-search-json-without-storage", lambda m, g, w: ["combine", f"{w}/nameless", "--output", f"{w}/c.json"],
     "search.json: field storage must be a non-empty string"),
    ("combine-neither-folder-nor-url", lambda m, g, w: ["combine", f"{w}/nothing", "--output", f"{w}/c.json"],
     "neither a search folder nor a storage URL"),
    ("combine-damaged-study", lambda m, g, w: ["combine", f"{w}/damaged", "--output", f"{w}/c.json"],
     "study database"),
    ("combine-url-to-a-text-file", lambda m, g, w: ["combine", f"sqlite:///{w}/bad.json", "--output", f"{w}/c.json"],
     "file is not a database"),
    ("combine-output-is-a-folder", lambda m, g, w: ["combine", f"{w}/held", "--output", f"{w}/empty"], "is a folder"),
    ("combine-top-k-0", lambda m, g, w: ["combine", f"{w}/held", "--output", f"{w}/c.json", "--top-k", "0"],
     "--top-k: must be 1"),
    ("combine-top-k-above-trials", lambda m, g, w: ["combine", f"{w}/held", "--output", f"{w}/c.json", "--top-k", "5"],
     "fewer than top-k = 5"),
    ("combine-rule-unknown", lambda m, g, w: ["combine", f"{w}/held", "--output", f"{w}/c.json", "--rule", "mode"],
     "invalid choice: 'mode'"),
    ("combine-no-output", lambda m, g, w: ["combine", f"{w}/held"], "required: --output"),
    # evaluate
    ("eval-combined-without-file", lambda m, g, w: run_args("evaluate", m, g, f"{w}/e") + ["--methods", "combined"],
     "no --combined file"),
    ("eval-method-unknown", lambda m, g, w: run_args("evaluate", m, g, f"{w}/e") + ["--methods", "flat,bogus"],
     "unknown 'bogus'"),
    ("eval-method-dist", lambda m, g, w: run_args("evaluate", m, g, f"{w}/e") + ["--methods", "dist"],
     "unknown 'dist'"),
    ("eval-paper-with-other-scheme", lambda m, g, w: run_args("evaluate", m, g, f"{w}/e") + ["--scheme", "depth:4"],
     "--methods paper needs 10 regions, but --scheme depth:4 makes 6"),
    ("eval-seeds-word", lambda m, g, w: run_args("evaluate", m, g, f"{w}/e") + ["--seeds", "a"],
     "'a' is not a whole number"),
    ("eval-seeds-empty", lambda m, g, w: run_args("evaluate", m, g, f"{w}/e") + ["--seeds", ""], "--seeds"),
    ("eval-seeds-repeated", lambda m, g, w: run_args("evaluate", m, g, f"{w}/e") + ["--seeds", "0,0"], "distinct"),
    ("eval-seeds-negative", lambda m, g, w: run_args("evaluate", m, g, f"{w}/e") + ["--seeds", "-1"], "distinct"),
    ("eval-pair-of-one", lambda m, g, w: run_args("evaluate", m, g, f"{w}/e") + ["--pairs", "rte"], "two or more"),
    ("eval-pair-unknown-task", lambda m, g, w: run_args("evaluate", m, g, f"{w}/e") + ["--pairs", "rte,mrpc;cola,sst9"],
     "unknown GLUE task 'sst9'"),
    ("eval-combined-missing", lambda m, g, w: run_args("evaluate", m, g, f"{w}/e") + ["--combined", f"{w}/none.json"],
     "does not exist"),
    ("eval-combined-string", lambda m, g, w: run_args("evaluate", m, g, f"{w}/e") + ["--combined", f"{w}/bad.json"],
     "'lrs' must be a list of numbers"),
    ("eval-combined-malformed", lambda m, g, w: run_args("evaluate", m, g, f"{w}/e") + ["--combined",
                                                                                         f"{w}/broken.json"],
     "not valid JSON"),
    ("eval-saved-run-damaged", lambda m, g, w: run_args("evaluate", m, g, f"{w}/evaldamaged") +
     ["--pairs", "rte,mrpc", "--methods", "flat", "--seeds", "0"], "rte-mrpc-flat-seed0.json is not valid JSON"),
    # summary
    ("summary-no-runs", lambda m, g, w: ["summary", f"{w}/empty"], "no run files"),
    ("summary-damaged-file", lambda m, g, w: ["summary", f"{w}/broken.json"], "broken.json is not valid JSON"),
    ("summary-missing-source", lambda m, g, w: ["summary", f"{w}/nothing"], "neither a folder nor a run file"),
    ("summary-output-is-a-folder", lambda m, g, w: ["summary", f"{w}/empty", "--output", f"{w}/empty"], "is a folder"),
    # report
    ("report-output-is-a-file", lambda m, g, w: ["report", f"{w}/held", "--output", f"{w}/bad.json"], "is a file"),
    ("report-evaluation-missing", lambda m, g, w: ["report", f"{w}/held", "--output", f"{w}/r", "--evaluation",
                                                   f"{w}/none.json"], "does not exist"),
    ("report-evaluation-not-one", lambda m, g, w: ["report", f"{w}/held", "--output", f"{w}/r", "--evaluation",
                                                   f"{w}/bad.json"], "not an evaluate.json"),
    ("report-combined-malformed", lambda m, g, w: ["report", f"{w}/held", "--output", f"{w}/r", "--combined",
                                                   f"{w}/broken.json"], "not valid JSON"),
    ("report-missing-sqlite", lambda m, g, w: ["report", f"sqlite:///{w}/missing.db", "--output", f"{w}/r"],
     "no database file"),
    ("report-damaged-study", lambda m, g, w: ["report", f"{w}/damaged", "--output", f"{w}/r"], "study database"),
    # regions, demo, bench, the command itself
    ("regions-model-not-cached", lambda m, g, w: ["regions", "no-such-org/x"], "not in the Hugging Face cache"),
    ("regions-empty-folder", lambda m, g, w: ["regions", f"{w}/empty"], "holds no config.json"),
    ("regions-scheme-depth-word", lambda m, g, w: ["regions", m, "--scheme", "depth:x"], "positive integer N"),
    ("demo-steps-0", lambda m, g, w: ["demo", "--steps", "0"], "--steps: must be 1"),
    ("demo-empty-folder", lambda m, g, w: ["demo", "--model", f"{w}/empty"], "holds no config.json"),
    ("bench-dtype-unknown", lambda m, g, w: ["bench", "--dtypes", "float99"], "unknown 'float99'"),
    ("bench-set-unknown", lambda m, g, w: ["bench", "--sets", "huge"], "unknown 'huge'"),
    ("bench-reps-0", lambda m, g, w: ["bench", "--reps", "0"], "--reps: must be 1"),
    ("no-command", lambda m, g, w: [], "required: COMMAND"),
    ("unknown-command", lambda m, g, w: ["train"], "invalid choice: 'train'"),
]
# A read-only --output is found at the start (before loading data or training), for every command that writes.
READ_ONLY = [
    ("ro-finetune", lambda m, g, w: run_args("finetune", m, g, f"{w}/ro/out")),
    ("ro-search", lambda m, g, w: run_args("search", m, g, f"{w}/ro/out")),
    ("ro-evaluate", lambda m, g, w: run_args("evaluate", m, g, f"{w}/ro/out")),
    ("ro-combine", lambda m, g, w: ["combine", f"{w}/held", "--output", f"{w}/ro/combined.json"]),
    ("ro-report", lambda m, g, w: ["report", f"{w}/held", "--output", f"{w}/ro/out"]),
    ("ro-summary", lambda m, g, w: ["summary", f"{w}/held", "--output", f"{w}/ro/table.md"]),
]
COUNT = len(ROWS) + len(READ_ONLY)  # the number of bad inputs the README quotes


def ids(rows):
    return [r.values[0] if hasattr(r, "values") else r[0] for r in rows]


@pytest.mark.parametrize("name,argv,phrase", ROWS, ids=ids(ROWS))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, argv, phrase, ws, minilm_path, glue_dir, capfd):
    before = tree(ws)
    code = main(argv(str(minilm_path), str(glue_dir), str(ws)))
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("lrdist") and ": error: " in lines[0] and phrase in lines[0], lines[0]
    assert out == ""
    assert tree(ws) == before  # nothing created, written or touched


@pytest.mark.parametrize("name,argv", READ_ONLY, ids=[r[0] for r in READ_ONLY])
def test_read_only_output_is_found_first(name, argv, ws, minilm_path, glue_dir):
    """As root, permission bits do not bind: run the command without the capability that overrides them."""
    (ws / "ro").mkdir()
    (ws / "ro").chmod(0o555)
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: a read-only folder cannot be made")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    before = tree(ws)
    run = subprocess.run(prefix + [sys.executable, "-m", "lrdist.cli", *argv(str(minilm_path), str(glue_dir), str(ws))],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = run.stderr.splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert f"{ws}/ro is not writable" in lines[0], lines[0]
    assert tree(ws) == before


def test_the_readme_counts_every_row():
    readme = (REPO / "README.md").read_text()
    assert f"{COUNT} bad inputs tried, {COUNT} give a one-line error" in readme
