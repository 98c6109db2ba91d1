"""Bayesian search over LR distributions with Optuna: one study per task sequence.

The paper's search (AutoGluon, Bayesian optimisation with Hyperband) made resumable and parallel:
* space: one log-uniform LR per region in [1e-7, 1e-3] (or scales of a base LR); the first trial is the
  flat 1e-5 baseline, as the paper's was;
* objective: the paper's (first task's accuracy after the last + the last task's), or others;
* pruning: an intermediate value after each epoch, judged by Hyperband (or median);
* storage: SQLite in the run folder by default, any SQLAlchemy URL, or a journal file; running the same
  command again resumes; ``--workers N`` processes (or several machines) share one study;
* a trial whose worker died is failed and re-queued with the same LRs: on this host from the worker's
  PID (any storage), elsewhere from Optuna's heartbeat (RDB storages);
* ``batch_trials`` K > 1: a worker asks for K trials at once and trains them together (lrdist/batched.py);
* placement: worker w runs on ``devices[w % len(devices)]`` (default: every visible CUDA device, else cpu).
Each worker loads the data and the pretrained weights once; a trial restores the weights from memory and
rewrites the optimizer's region table.
"""
from __future__ import annotations

import fcntl
import json
import math
import multiprocessing as mp
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)

from lrdist.continual import Recipe, SequentialRunner
from lrdist.methods import Distribution
from lrdist.placement import place_workers, visible_devices

OBJECTIVES = ("paper", "mean_accuracy", "forgetting")
FLAT_FIRST_TRIAL = 1e-5  # the paper's first trial
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class SearchSpace:
    """Log-uniform values per region: absolute LRs, or scales of the recipe's base LR."""

    num_regions: int = 10
    low: float = 1e-7
    high: float = 1e-3
    kind: str = "absolute"

    def __post_init__(self):
        if self.kind not in ("absolute", "scale"):
            raise ValueError(f"search space kind must be 'absolute' or 'scale', got {self.kind!r}")
        if not 0 < self.low < self.high:
            raise ValueError(f"search bounds need 0 < low < high, got [{self.low}, {self.high}]")

    def names(self) -> list[str]:
        prefix = "lr" if self.kind == "absolute" else "scale"
        return [f"{prefix}_{r}" for r in range(self.num_regions)]

    def suggest(self, trial) -> list[float]:
        return [trial.suggest_float(n, self.low, self.high, log=True) for n in self.names()]

    def lrs(self, values: list[float], base_lr: float) -> list[float]:
        return list(values) if self.kind == "absolute" else [base_lr * v for v in values]

    def flat(self, lr: float, base_lr: float) -> dict | None:
        value = lr if self.kind == "absolute" else lr / base_lr
        if not self.low <= value <= self.high:
            return None
        return {n: value for n in self.names()}


@dataclass
class SearchConfig:
    model: str
    tasks: list[str]
    recipe: Recipe
    data_dir: str | None
    output: str
    trials: int = 8
    storage: str | None = None
    study_name: str | None = None
    workers: int = 1
    space: SearchSpace = SearchSpace()
    objective: str = "paper"
    sampler: str = "tpe"
    pruner: str = "hyperband"
    seed: int = 0
    backend: str = "auto"
    heartbeat_interval: int = 30
    grace_period: int = 90
    progress: bool = True
    batch_trials: int = 1             # K trials trained together by each worker
    devices: list[str] | None = None  # where workers run, round-robin (None: all visible CUDA devices, else cpu)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        if self.sampler not in ("tpe", "gp"):
            raise ValueError(f"unknown sampler {self.sampler!r}; choose tpe or gp")
        if self.pruner not in ("hyperband", "median", "none"):
            raise ValueError(f"unknown pruner {self.pruner!r}; choose hyperband, median or none")
        if self.trials < 1 or self.workers < 1:
            raise ValueError("--trials and --workers must be at least 1")
        if self.batch_trials < 1:
            raise ValueError(f"--batch-trials must be at least 1, got {self.batch_trials}")
        self.study_name = self.study_name or "lrdist-" + "-".join(self.tasks)
        self.storage = self.storage or f"sqlite:///{Path(self.output).resolve() / 'study.db'}"

    def placement(self) -> list[str]:
        """The device of each worker (checked against the visible ones)."""
        visible = visible_devices()
        return place_workers(self.workers, self.devices or visible, visible)

    def identity(self) -> dict:
        """What a study must agree on to be resumed or shared."""
        return {"tasks": self.tasks, "space": asdict(self.space), "objective": self.objective,
                "recipe": asdict(self.recipe), "model": Path(self.model).name}


def make_storage(url: str, cfg: SearchConfig | None = None):
    """An Optuna storage from a URL: ``journal:PATH`` (or a .log/.journal path) or a SQLAlchemy URL."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        path = Path(url.split(":", 1)[1] if url.startswith("journal:") else url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}}
    if cfg is not None:  # heartbeats: a dead worker's trial is failed and re-queued with its LRs
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        if retry is not None:
            kwargs["heartbeat_stale_trial_callback"] = retry(max_retry=3)
        else:  # Optuna < 4.9
            kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=3)
        kwargs.update(heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period)
    for attempt in range(5):
        try:
            return RDBStorage(url, **kwargs)
        except Exception as exc:
            # Workers starting together on a fresh database race to create its tables: try again.
            if attempt < 4 and "IntegrityError" in type(exc).__name__ + str(exc):
                time.sleep(0.5 + attempt)
                continue
            raise ValueError(f"cannot open the study storage {url!r}: {exc}") from None


def objective_value(res: dict, name: str) -> float:
    if name == "paper":
        return res["objective"]
    if name == "mean_accuracy":
        return res["mean_final_accuracy"]
    return -res["mean_forgetting"]


def compact(res: dict) -> dict:
    """What a trial keeps as user attributes: everything but the bulky config."""
    keep = ("tasks", "accuracy_matrix", "metrics_matrix", "metric_names", "forgetting", "mean_forgetting", "bwt",
            "objective", "mean_final_accuracy", "lrs", "task_seconds", "total_seconds")
    return {k: res[k] for k in keep}


class _LocalLock:
    """Serialises 'count trials, then start one' among workers on this machine (a file lock)."""

    def __init__(self, cfg: SearchConfig):
        self.path = Path(cfg.output) / ".search.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = None

    def acquire(self):
        self.fh = open(self.path, "a")
        fcntl.flock(self.fh, fcntl.LOCK_EX)

    def release(self):
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_orphans(study: optuna.Study) -> int:
    """Fail RUNNING trials whose worker on this host is gone, and queue their LRs again."""
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker and worker["host"] == host and worker["pid"] != os.getpid() and not _alive(worker["pid"]):
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            n += 1
    if isinstance(study._storage, optuna.storages.RDBStorage):  # heartbeats: workers on other machines
        optuna.storages.fail_stale_trials(study)
    return n


def open_study(cfg: SearchConfig, worker: int = 0) -> optuna.Study:
    storage = make_storage(cfg.storage, cfg)
    if cfg.sampler == "gp":
        sampler = optuna.samplers.GPSampler(seed=cfg.seed + worker)
    else:  # distinct seeds, or two workers would propose the same LRs
        sampler = optuna.samplers.TPESampler(seed=cfg.seed + worker, n_startup_trials=5)
    epochs = cfg.recipe.epochs * len(cfg.tasks)
    pruner = {"hyperband": optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3),
              "median": optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
              "none": optuna.pruners.NopPruner()}[cfg.pruner]
    study = optuna.create_study(storage=storage, study_name=cfg.study_name, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    identity = cfg.identity()
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", identity)
        flat = cfg.space.flat(FLAT_FIRST_TRIAL, cfg.recipe.lr)
        if flat is not None and not study.get_trials(deepcopy=False):
            study.enqueue_trial(flat, user_attrs={"baseline": "flat 1e-5"})
    elif stored != identity:
        diff = sorted(k for k in identity if identity[k] != stored.get(k))
        raise ValueError(f"study {cfg.study_name!r} in {cfg.storage} was made with a different {', '.join(diff)}; "
                         f"choose another --study-name or --output")
    return study


def count(study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def run_worker(cfg: SearchConfig, worker: int = 0) -> None:
    """One worker: load everything once, then run trials until the study holds ``cfg.trials`` finished."""
    study = open_study(cfg, worker)
    device = cfg.placement()[worker]
    if device.startswith("cuda"):
        import torch
        torch.cuda.set_device(device)  # the Triton kernel launches on the current device
    runner = SequentialRunner(cfg.model, cfg.tasks, cfg.recipe, data_dir=cfg.data_dir, backend=cfg.backend,
                              progress=False, device=device)
    if cfg.batch_trials > 1:
        return run_batched_worker(cfg, study, runner, worker)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    last_step = cfg.recipe.epochs * len(cfg.tasks) - 1

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", me)
        values = cfg.space.suggest(trial)
        lrs = cfg.space.lrs(values, cfg.recipe.lr)

        def report(step, value):
            trial.report(value, step)
            if step < last_step and trial.should_prune():  # at the last report the work is done: keep it
                raise optuna.TrialPruned()
        res = runner.run(Distribution(lrs, "absolute", f"trial {trial.number}"),
                         report=None if cfg.pruner == "none" else report)
        trial.set_user_attr("results", compact(res))
        return objective_value(res, cfg.objective)

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.trials, desc=f"search {cfg.study_name}", disable=not (cfg.progress and worker == 0))
    lock = _LocalLock(cfg)
    while True:
        lock.acquire()
        recover_orphans(study)
        done, running = count(study, FINISHED), count(study, (TrialState.RUNNING,))
        bar.n = min(done, cfg.trials)
        bar.refresh()
        if done >= cfg.trials:
            lock.release()
            break
        if done + running >= cfg.trials:  # the last trials run elsewhere: wait for them (or their recovery)
            lock.release()
            time.sleep(1.0)
            continue
        # optimize() creates the trial and keeps Optuna's heartbeat going; the objective releases the
        # lock once the trial exists, so workers never start more than the requested trials.
        study.optimize(lambda trial: (lock.release(), objective(trial))[1], n_trials=1)
        lock.release()  # no-op unless the trial failed before the objective ran
    bar.close()


def run_batched_worker(cfg: SearchConfig, study: optuna.Study, runner: SequentialRunner, worker: int = 0) -> None:
    """Like run_worker, K trials at a time: asked together, trained together, told one by one."""
    from contextlib import ExitStack

    from optuna.storages._heartbeat import get_heartbeat_thread

    from lrdist.batched import BatchedRunner
    batched = BatchedRunner(runner)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    last_step = cfg.recipe.epochs * len(cfg.tasks) - 1
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.trials, desc=f"search {cfg.study_name}", disable=not (cfg.progress and worker == 0))
    while True:
        with _LocalLock(cfg):  # count, then start no more trials than the study still needs
            recover_orphans(study)
            done, running = count(study, FINISHED), count(study, (TrialState.RUNNING,))
            bar.n = min(done, cfg.trials)
            bar.refresh()
            free = cfg.trials - done - running
            trials = [study.ask() for _ in range(min(cfg.batch_trials, max(free, 0)))]  # queued ones first
            for t in trials:
                t.set_user_attr("worker", me)
        if done >= cfg.trials:
            break
        if not trials:  # the last trials run elsewhere: wait for them (or their recovery)
            time.sleep(1.0)
            continue
        lrs = [cfg.space.lrs(cfg.space.suggest(t), cfg.recipe.lr) for t in trials]

        def report(k, step, value):
            trials[k].report(value, step)
            return step < last_step and trials[k].should_prune()  # at the last report the work is done
        with ExitStack() as beats:  # Optuna's heartbeat per trial, as optimize() keeps for one
            for t in trials:
                beats.enter_context(get_heartbeat_thread(t._trial_id, study._storage))
            try:
                results = batched.run([Distribution(l, "absolute", f"trial {t.number}") for l, t in zip(lrs, trials)],
                                      report=None if cfg.pruner == "none" else report)
            except Exception:
                for t in trials:
                    study.tell(t, state=TrialState.FAIL)
                raise
        for t, res in zip(trials, results):
            if res.get("status") == "pruned":
                study.tell(t, state=TrialState.PRUNED)
            else:
                t.set_user_attr("results", compact(res))
                study.tell(t, objective_value(res, cfg.objective))
    bar.close()


def _worker_entry(cfg: SearchConfig, worker: int) -> None:
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.workers))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_worker(cfg, worker)


def search(cfg: SearchConfig) -> optuna.Study:
    """Run (or resume) the study with ``cfg.workers`` local processes; return it when complete."""
    cfg.placement()  # a bad --devices fails here, before anything is written
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    with _LocalLock(cfg):  # create it, and enqueue the flat trial, before any worker starts
        study = open_study(cfg)
    (Path(cfg.output) / "search.json").write_text(json.dumps(
        {"storage": cfg.storage, "study_name": cfg.study_name, **cfg.identity()}, indent=2))
    if cfg.workers == 1:
        run_worker(cfg, 0)
    else:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_entry, args=(cfg, w)) for w in range(1, cfg.workers)]
        for p in procs:
            p.start()
        try:
            _worker_entry(cfg, 0)
        finally:
            for p in procs:
                p.join()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"{len(bad)} search worker(s) failed (exit codes {bad})")
    return study


def completed_trials(study: optuna.Study) -> list:
    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                  key=lambda t: t.value, reverse=True)


def format_trials(study: optuna.Study, limit: int = 10) -> str:
    trials = completed_trials(study)
    lines = [f"study {study.study_name}: {len(trials)} complete, "
             f"{count(study, (TrialState.PRUNED,))} pruned, {count(study, (TrialState.FAIL,))} failed",
             f"{'trial':>5} {'objective':>9}  {'forgetting':>10}  lrs (per region)"]
    for t in trials[:limit]:
        res = t.user_attrs.get("results", {})
        lrs = " ".join(f"{v:.1e}" for v in res.get("lrs", []))
        note = "  (flat baseline)" if t.user_attrs.get("baseline") else ""
        lines.append(f"{t.number:>5} {t.value:>9.4f}  {res.get('mean_forgetting', math.nan):>+10.4f}  {lrs}{note}")
    return "\n".join(lines)
