"""Result files are written whole or not at all (lrdist/files.py), by every writer, even under kill -9."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from lrdist.files import read_json, write_atomic, write_json
from lrdist.preflight import InputError


def test_write_atomic_replaces_whole_files_with_the_usual_permissions(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["r.json"]  # no temporary file left behind

    def fails(f):
        f.write(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        write_atomic(path, fails)
    assert path.read_bytes() == b"\x00\x01" and os.listdir(path.parent) == ["r.json"]


def test_two_processes_writing_one_file_never_share_a_temporary_name(tmp_path):
    """Each writes its own large content 10 times; the file is always one of them, whole."""
    path = tmp_path / "shared.json"
    script = ("import sys\nfrom lrdist.files import write_json\n"
              "for _ in range(10): write_json(sys.argv[1], {'who': sys.argv[2], 'data': [sys.argv[2]] * 200000})\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), who], cwd=REPO) for who in "ab"]
    while any(p.poll() is None for p in procs):
        if path.exists():
            data = json.loads(path.read_text())  # never a mix or a truncated file
            assert data["data"] == [data["who"]] * 200000
    assert [p.returncode for p in procs] == [0, 0]
    assert json.loads(path.read_text())["who"] in "ab" and os.listdir(tmp_path) == ["shared.json"]


def test_a_damaged_file_is_named_in_one_line(tmp_path):
    (tmp_path / "run.json").write_text('{"objective": 1.2, "tasks": [')  # what a non-atomic writer could leave
    with pytest.raises(InputError) as info:
        read_json(tmp_path / "run.json", "the saved run", fix="--force moves it aside")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"the saved run {tmp_path / 'run.json'} is not valid JSON")
    assert message.endswith("; --force moves it aside")


# Every writer of results, looped in a process killed with SIGKILL at a random moment: the file it writes
# must then hold the previous or the next content, whole. A server process imports lrdist once and forks one
# writer process per kill (fork is cheap; a fresh interpreter per kill would take seconds).
SERVER = r'''
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from lrdist import files, evaluate, combine, report, continual

signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed writers are reaped without a wait
study, ref = sys.argv[1], sys.argv[2]

def runs(k):  # an evaluate result of many runs, as written at the end of a command
    rows = [{"tasks": ["rte", "mrpc"], "method": m, "seed": s, "objective": 1.0 + k + s / 1e4, "mean_forgetting": 0.1,
             "bwt": -0.1, "mean_final_accuracy": 0.6, "accuracy_matrix": [[0.6, None], [0.5, 0.7]],
             "majority_rate": {"rte": 0.5, "mrpc": 0.68}, "eval_samples": {"rte": 100, "mrpc": 100}}
            for m in ("flat", "ewc") for s in range(3000)]
    return {"sequences": [["rte", "mrpc"]], "seeds": list(range(3000)), "tuned": {},
            "summary": evaluate.summarise_runs(rows, ["flat", "ewc"]), "runs": rows}

WRITERS = {  # name -> (write(folder, k) for content k = 0 or 1, the files it writes)
    "write_json": (lambda d, k: files.write_json(os.path.join(d, "results.json"), {"k": k, "x": [k] * 400000}),
                   ["results.json"]),
    "evaluate.write_outputs": (lambda d, k: evaluate.write_outputs(RUNS[k], __import__("pathlib").Path(d)),
                               ["evaluate.json", "evaluate.md"]),
    "checkpoint": (lambda d, k: continual._save_atomic({"model": torch.full((3_000_000,), float(k))},
                                                       __import__("pathlib").Path(d, "checkpoint.pt")),
                   ["checkpoint.pt"]),
    "combine.combine_sources": (lambda d, k: combine.combine_sources([study], os.path.join(d, "combined.json"),
                                                                     rule=("geometric", "arithmetic")[k]),
                                ["combined.json"]),
    "report.make_report": (lambda d, k: report.make_report([study], d, evaluate_file=(None, EVAL)[k]),
                           ["report.md", "distributions.png", "history.png"]),
}
RUNS = [runs(0), runs(1)]
EVAL = os.path.join(ref, "evaluation.json")
files.write_json(EVAL, RUNS[0])
for name, (write, _) in WRITERS.items():  # the two contents each writer alternates between
    for k in (0, 1):
        write(os.path.join(ref, name, str(k)), k)
print("ready", flush=True)
for line in sys.stdin:
    name, folder = json.loads(line)
    write, _ = WRITERS[name]
    pid = os.fork()
    if pid == 0:
        write(folder, 0)
        print("written", flush=True)
        k = 1
        while True:
            write(folder, k)
            k = 1 - k
    print(pid, flush=True)
'''
WRITTEN = {"write_json": ["results.json"], "evaluate.write_outputs": ["evaluate.json", "evaluate.md"],
           "checkpoint": ["checkpoint.pt"], "combine.combine_sources": ["combined.json"],
           "report.make_report": ["report.md", "distributions.png", "history.png"]}


def test_kill_9_during_every_writer_leaves_the_old_or_the_new_file_whole(tmp_path, cli_search):
    ref = tmp_path / "ref"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(cli_search[0]), str(ref)], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rng = random.Random(0)
    try:
        assert server.stdout.readline().strip() == "ready"
        for name, names in WRITTEN.items():
            for attempt in range(3):
                folder = tmp_path / name / str(attempt)
                server.stdin.write(json.dumps([name, str(folder)]) + "\n")
                server.stdin.flush()
                lines = [server.stdout.readline().strip() for _ in range(2)]  # the writer's pid; its first write
                pid = int(next(x for x in lines if x.isdigit()))
                time.sleep(rng.uniform(0.0, 0.4))  # into the loop, at a random point of some write
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)
                for file in names:
                    data = (folder / file).read_bytes()
                    assert data in ((ref / name / "0" / file).read_bytes(), (ref / name / "1" / file).read_bytes()), \
                        f"{name}: {file} is neither the old nor the new content after kill -9 ({len(data)} bytes)"
                leftovers = [p for p in os.listdir(folder) if p.endswith(".tmp")]
                assert all(re.fullmatch(r"\..+\.\w+\.tmp", p) for p in leftovers)  # at most the unfinished temp
    finally:
        server.kill()
        server.wait()


def test_every_file_lrdist_writes_goes_through_the_atomic_helper():
    """No module writes a result in place: every write_text, json.dump, open(.., "w"), savefig or torch.save to
    a path would bypass lrdist.files (savefig and torch.save are allowed into the file object it hands over;
    the search's lock file, opened to append and never written, is no result)."""
    bypass = re.compile(r"\.write_text\(|\.write_bytes\(|json\.dump\(|open\([^)]*['\"][wx]b?\+?['\"]|"
                        r"savefig\((?!f,)|torch\.save\((?!obj, f\))")
    found = []
    for path in sorted((REPO / "lrdist").rglob("*.py")):
        if path.name == "files.py" or "kernels" in path.parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if bypass.search(line) and not line.lstrip().startswith("#"):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


WRITER = '''
import sys, time
from lrdist.files import write_atomic
def slow(f):
    f.write(b"partial")
    print("writing", flush=True)
    time.sleep(60)
write_atomic(sys.argv[1], slow)
'''


def test_the_temporaries_a_killed_writer_left_go_at_the_next_write(tmp_path):
    """A kill -9 mid-write leaves .NAME.HOST-PID.*.tmp; the next write of NAME removes it, never the
    temporary of a writer still alive."""
    target = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    try:
        for w in writers:
            assert w.stdout.readline().strip() == "writing"
        temps = {w.pid: [p for p in tmp_path.iterdir() if f"-{w.pid}." in p.name] for w in writers}
        assert all(len(t) == 1 and t[0].name.endswith(".tmp") for t in temps.values())
        writers[0].kill()  # SIGKILL
        writers[0].wait()
        write_atomic(target, "whole")
        assert target.read_text() == "whole"
        assert not temps[writers[0].pid][0].exists()  # the dead writer's: removed
        assert temps[writers[1].pid][0].exists()  # the live one's: kept
    finally:
        for w in writers:
            w.kill()
            w.wait()
