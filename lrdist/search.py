"""Bayesian search over LR distributions with Optuna: one study per task sequence.

The paper's search (AutoGluon, Bayesian optimisation with Hyperband) made resumable and parallel:
* space: one log-uniform LR per region in [1e-7, 1e-3] (or scales of a base LR); the first trial is the
  flat baseline at the recipe's LR (the paper's first trial was a flat 1e-5; ours is the flat run the
  comparison uses, so the search is measured against a baseline that learns);
* objective: the paper's (first task's accuracy after the last + the last task's), or others;
* pruning: an intermediate value after each epoch, judged by Hyperband (or median);
* storage: SQLite in the run folder by default, any SQLAlchemy URL, or a journal file; running the same
  command again resumes; ``--workers N`` processes (or several machines) share one study;
* a trial whose worker died is failed and re-queued with the same LRs and labels: on this host from the
  worker's PID (any storage), elsewhere from Optuna's heartbeat (RDB storages);
* across machines: each process samples with its own random seed (recorded on its trials), the flat
  trial is queued once, by the process that created the study, and a trial numbered after ``trials``
  live ones ends untrained, so the study holds exactly ``trials`` finished ones.
* ``batch_trials`` K > 1: a worker asks for K trials at once and trains them together (lrdist/batched.py);
* placement: worker w runs on ``devices[w % len(devices)]`` (default: every visible CUDA device, else cpu).
Each worker loads the data and the pretrained weights once; a trial restores the weights from memory and
rewrites the optimizer's region table.
"""
from __future__ import annotations

import contextlib
import fcntl
import math
import multiprocessing as mp
import os
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna
from optuna.trial import TrialState

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)

from lrdist import identity, stats, trial_files
from lrdist.continual import Recipe, SequentialRunner, resolve_device
from lrdist.files import alive, write_json
from lrdist.methods import Distribution
from lrdist.stats import pm, sum_se
from lrdist.placement import place_workers, visible_devices

OBJECTIVES = ("paper", "mean_accuracy", "forgetting")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)  # not failed
MAX_RETRIES = 3  # a trial whose worker dies is queued again at most this many times


@dataclass(frozen=True)
class SearchSpace:
    """Log-uniform values per region: absolute LRs, or scales of the recipe's base LR.

    Regions in ``empty`` hold no parameter of the model (bert10 on a model of fewer than 8 layers): they
    get no dimension in the space (no trial is spent on them) and ``None`` in a trial's LRs.
    """

    num_regions: int = 10
    low: float = 1e-7
    high: float = 1e-3
    kind: str = "absolute"
    empty: tuple = ()

    def __post_init__(self):
        if self.kind not in ("absolute", "scale"):
            raise ValueError(f"search space kind must be 'absolute' or 'scale', got {self.kind!r}")
        if not 0 < self.low < self.high:
            raise ValueError(f"search bounds need 0 < low < high, got [{self.low}, {self.high}]")
        object.__setattr__(self, "empty", tuple(sorted(set(self.empty))))
        if any(not 0 <= r < self.num_regions for r in self.empty) or len(self.empty) >= self.num_regions:
            raise ValueError(f"empty regions {list(self.empty)} do not fit {self.num_regions} regions")

    @property
    def active(self) -> list[int]:
        return [r for r in range(self.num_regions) if r not in self.empty]

    @classmethod
    def for_model(cls, model_id: str, scheme: str = "bert10", **kw) -> "SearchSpace":
        """A space over the regions of ``model_id`` under ``scheme``, leaving out its empty regions."""
        from lrdist.regions import model_regions
        rmap = model_regions(model_id, scheme)
        return cls(num_regions=rmap.num_regions, empty=rmap.empty, **kw)

    def names(self) -> list[str]:
        prefix = "lr" if self.kind == "absolute" else "scale"
        return [f"{prefix}_{r}" for r in self.active]

    def suggest(self, trial) -> list[float | None]:
        values = dict(zip(self.active, (trial.suggest_float(n, self.low, self.high, log=True) for n in self.names())))
        return [values.get(r) for r in range(self.num_regions)]

    def lrs(self, values: list, base_lr: float) -> list:
        return list(values) if self.kind == "absolute" else [None if v is None else base_lr * v for v in values]

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
    space: SearchSpace | None = None  # default: every non-empty region of the model, [1e-7, 1e-3]
    objective: str = "paper"
    sampler: str = "tpe"
    pruner: str = "hyperband"
    seed: int = 0
    backend: str = "auto"
    device: str | None = None
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
        # Trials are scored on a held-out slice of each task's train split, never on the validation split
        # that final numbers (lrdist evaluate) are reported on.
        self.recipe = replace(self.recipe, eval_on="heldout")
        if self.space is None:
            self.space = SearchSpace.for_model(self.model, self.recipe.scheme)
        if self.heartbeat_interval < 1:
            raise ValueError(f"--heartbeat-interval must be at least 1 second, got {self.heartbeat_interval}")
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(f"--grace-period ({self.grace_period} s) must exceed --heartbeat-interval "
                             f"({self.heartbeat_interval} s), or live trials are failed between beats; "
                             f"e.g. --grace-period {3 * self.heartbeat_interval}")
        resolve_device(self.device)  # a CUDA device this machine lacks fails here, before anything starts
        if self.batch_trials < 1:
            raise ValueError(f"--batch-trials must be at least 1, got {self.batch_trials}")
        self.study_name = self.study_name or "lrdist-" + "-".join(self.tasks)
        self.storage = self.storage or own_storage_url(self.output)

    def placement(self) -> list[str]:
        """The device of each worker (checked against the visible ones)."""
        visible = visible_devices()
        return place_workers(self.workers, self.devices or visible, visible)

    def identity(self) -> dict:
        """What a study must agree on to be resumed or shared: the model and data by content, the recipe,
        the workers' device type, space, objective, sampler and pruner (lrdist.identity; package versions
        are only warned about). A sampler or pruner changed on resume would judge the old trials by other
        rules, so it is refused like the rest."""
        return identity.make(self.model, self.tasks, self.recipe, self.data_dir, self.placement(),
                             space=asdict(self.space), objective=self.objective, sampler=self.sampler,
                             pruner=self.pruner)

    @property
    def trials_dir(self) -> Path:
        """Where each finished trial is also kept as a JSON file (lrdist.trial_files)."""
        return Path(self.output) / "trials"

    @property
    def own_storage(self) -> bool:
        """Whether the study lives in the output folder's own database (which --force may move aside)."""
        return self.storage == own_storage_url(self.output)


OWN_DB = "study.db"  # search.json's name for the folder's own database: the folder can move between machines


def own_storage_url(folder) -> str:
    return f"sqlite:///{Path(folder).resolve() / OWN_DB}"


def folder_storage(folder, info: dict) -> str | None:
    """The storage URL of a search folder's study (search.json ``info``); None when the study is the
    folder's own database and that is absent (then its trial files hold the study: lrdist.trial_files)."""
    url = info.get("storage")
    if url in (OWN_DB, own_storage_url(folder)):
        return own_storage_url(folder) if (Path(folder) / OWN_DB).is_file() else None
    return url


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
        new = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")  # Optuna >= 4.9 renamed the hook
        kwargs["heartbeat_stale_trial_callback" if new else "failed_trial_callback"] = requeue
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
    keep = ("tasks", "accuracy_matrix", "accuracy_se_matrix", "metrics_matrix", "metric_names", "forgetting",
            "mean_forgetting", "mean_forgetting_se", "bwt", "objective", "objective_se", "mean_final_accuracy",
            "lrs", "eval_on", "eval_samples", "majority_rate", "task_seconds", "total_seconds")
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


def requeue(study: optuna.Study, trial) -> None:
    """Queue a dead trial's LRs again with its labels (a retried flat trial stays the flat baseline)."""
    retries = trial.user_attrs.get("retries", 0)
    if retries >= MAX_RETRIES:
        return
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("worker", "results")}
    # A worker killed while suggesting left only some params: a queued trial's full set is in fixed_params.
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    study.enqueue_trial(params, user_attrs={**attrs, "retry_of": trial.number, "retries": retries + 1})


def _fail(study: optuna.Study, trial) -> bool:
    """Mark a running trial failed; False when another process got there first (the row is locked)."""
    try:
        return study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def recover_orphans(study: optuna.Study) -> int:
    """Fail RUNNING trials whose worker is gone, and queue their LRs again (once, whoever finds them)."""
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker and worker["host"] == host and worker["pid"] != os.getpid() and not alive(worker["pid"]):
            if _fail(study, t):
                requeue(study, t)
                n += 1
    # Workers on other machines: Optuna's heartbeat. A no-op for storages without one; Optuna wraps an
    # RDBStorage in a cache, so no isinstance test here.
    optuna.storages.fail_stale_trials(study)
    return n


def within_budget(study: optuna.Study, number: int, trials: int) -> bool:
    """Whether trial ``number`` may train: fewer than ``trials`` earlier-numbered trials are not failed.

    The storage numbers trials in creation order, and a failed trial never comes back, so every trial
    that trains saw all the others that train before it: at most ``trials`` ever finish, on any number
    of machines, without a lock they share."""
    return sum(t.number < number for t in study.get_trials(deepcopy=False, states=LIVE)) < trials


class SurplusTrial(Exception):
    """A trial created beyond the budget by a worker racing another machine: it ends untrained."""


def _create_study(storage, name: str) -> bool:
    """Create the study; True only in the one process whose insert wins (the name is unique)."""
    try:
        storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], name)
        return True
    except optuna.exceptions.DuplicatedStudyError:
        return False


def _stored_identity(study: optuna.Study, wait: float = 30.0):
    """The identity the study's creator records once it is set up (its flat trial queued)."""
    deadline = time.time() + wait
    while (stored := study.user_attrs.get("identity")) is None and time.time() < deadline:
        time.sleep(0.2)
    return stored


TPE_STARTUP_TRIALS = 5  # random trials before TPE models the results (the tuning of baselines uses the same)


def open_study(cfg: SearchConfig, seed: int | None = None, announce: bool = False) -> optuna.Study:
    """Open (creating if needed) the study. ``seed`` seeds the sampler; by default a fresh random one,
    so processes started together, on other machines or to resume never replay one sequence. A study made
    from something else is refused (identity.IdentityMismatch); ``announce`` warns about other package
    versions (once per command, not per worker)."""
    storage = make_storage(cfg.storage, cfg)
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    if cfg.sampler == "gp":
        sampler = optuna.samplers.GPSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS)
    epochs = cfg.recipe.epochs * len(cfg.tasks)
    pruner = {"hyperband": optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3),
              "median": optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
              "none": optuna.pruners.NopPruner()}[cfg.pruner]
    created = _create_study(storage, cfg.study_name)
    study = optuna.load_study(storage=storage, study_name=cfg.study_name, sampler=sampler, pruner=pruner)
    current = cfg.identity()
    if created:  # only this process queues the flat trial; the identity, written last, says it is done
        try:  # a study resumed from its trial files (e.g. committed from another machine)
            saved = trial_files.add_saved_trials(study, cfg.trials_dir, current, f"study {cfg.study_name!r}")
        except Exception:
            optuna.delete_study(study_name=cfg.study_name, storage=storage)  # leave no half-made study
            raise
        flat = cfg.space.flat(cfg.recipe.lr, cfg.recipe.lr)
        has_flat = any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False))
        if flat is not None and not has_flat:
            study.enqueue_trial(flat, user_attrs={"baseline": f"flat {cfg.recipe.lr:g}"})
        if saved:
            print(f"lrdist search: {saved} finished trial(s) of {cfg.study_name!r} taken from {cfg.trials_dir}",
                  file=sys.stderr, flush=True)
        study.set_user_attr("identity", current)
    stored = _stored_identity(study)
    if stored is None:  # made elsewhere (or its creator died while setting it up): adopt it
        study.set_user_attr("identity", current)
        return study
    what = f"study {cfg.study_name!r} in {cfg.storage}"
    way = identity.way_out(cfg.output) if cfg.own_storage else "choose another --study-name or --output"
    note = identity.check(stored, current, what, way)
    if announce:
        identity.warn(what, note)
        if not created:  # a database beside trial files (e.g. some copied from another machine): they agree
            trial_files.check_files(cfg.trials_dir, current, way)
            trial_files.check_against(study, cfg.trials_dir, what)
    return study


def count(study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def run_worker(cfg: SearchConfig, worker: int = 0) -> None:
    """One worker: load everything once, then run trials until the study holds ``cfg.trials`` finished."""
    seed = int.from_bytes(os.urandom(4), "little")
    study = open_study(cfg, seed)
    device = cfg.placement()[worker]
    if device.startswith("cuda"):
        import torch
        torch.cuda.set_device(device)  # the Triton kernel launches on the current device
    shown = cfg.progress and worker == 0  # one worker's bars: the trials, and the current trial's steps
    runner = SequentialRunner(cfg.model, cfg.tasks, cfg.recipe, data_dir=cfg.data_dir, device=device,
                              backend=cfg.backend, progress=shown)
    if (runner.regions.num_regions, runner.regions.empty) != (cfg.space.num_regions, cfg.space.empty):
        raise ValueError(f"the search space has {cfg.space.num_regions} regions (empty: {list(cfg.space.empty)}) "
                         f"but {cfg.model} with scheme {cfg.recipe.scheme} has {runner.regions.num_regions} "
                         f"(empty: {list(runner.regions.empty)}); build it with SearchSpace.for_model")
    if cfg.batch_trials > 1:
        return run_batched_worker(cfg, study, runner, worker)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "sampler_seed": seed}
    last_step = cfg.recipe.epochs * len(cfg.tasks) - 1
    lost = []  # trials another process declared dead (a late heartbeat) while this one trained them

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", me)
        if not within_budget(study, trial.number, cfg.trials):
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number} ends untrained: {cfg.trials} earlier trials are finished, "
                               f"running or queued (another worker started one at the same moment)")
        bar.set_postfix_str(f"running trial {trial.number}", refresh=True)
        values = cfg.space.suggest(trial)
        lrs = cfg.space.lrs(values, cfg.recipe.lr)

        def report(step, value):
            trial.report(value, step)
            if step < last_step and trial.should_prune():  # at the last report the work is done: keep it
                raise optuna.TrialPruned()
        try:
            res = runner.run(Distribution(lrs, "absolute", f"trial {trial.number}"),
                             report=None if cfg.pruner == "none" else report)
            trial.set_user_attr("results", compact(res))
        except optuna.exceptions.UpdateFinishedTrialError:
            lost.append(trial.number)
            raise
        return objective_value(res, cfg.objective)

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.trials, desc=f"search {cfg.study_name}", disable=not shown)
    lock = _LocalLock(cfg)
    while True:
        lock.acquire()
        recover_orphans(study)
        done, running = count(study, FINISHED), count(study, (TrialState.RUNNING,))
        bar.n = min(done, cfg.trials)
        bar.set_postfix_str("")  # (the trial just finished)
        if done >= cfg.trials:
            lock.release()
            break
        if done + running >= cfg.trials:  # the last trials run elsewhere: wait for them (or their recovery)
            lock.release()
            time.sleep(1.0)
            continue
        # optimize() creates the trial and keeps Optuna's heartbeat going; the objective releases the
        # lock once the trial exists, so workers of this folder never start more than the requested
        # trials (within_budget covers workers elsewhere).
        try:
            study.optimize(lambda trial: (lock.release(), objective(trial))[1], n_trials=1, catch=(SurplusTrial,))
        except Exception:
            if not lost:
                raise
            print(f"lrdist search: trial {lost.pop()} was declared dead by another worker (its heartbeat came "
                  f"late) and queued again; carrying on", file=sys.stderr)
        lock.release()  # no-op unless the trial failed before the objective ran
        trial_files.save_trials(study, cfg.trials_dir)
    trial_files.save_trials(study, cfg.trials_dir)  # trials other workers finished last
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
            with warnings.catch_warnings():  # ask() warns that heartbeats belong to optimize(): kept below
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
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
        trial_files.save_trials(study, cfg.trials_dir)
    trial_files.save_trials(study, cfg.trials_dir)  # trials other workers finished last
    bar.close()


def _worker_entry(cfg: SearchConfig, worker: int) -> None:
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.workers))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_worker(cfg, worker)


OUTPUTS = ("study.db", "study.db-journal", "search.json", "combined.json", "report.md", "distributions.png",
           "history.png", "methods.png", "trials")  # what --force moves aside with a study made from something else


def search(cfg: SearchConfig, force: bool = False) -> optuna.Study:
    """Run (or resume) the study with ``cfg.workers`` local processes; return it when complete. A study
    made from something else is refused before any trial runs; with ``force`` (and the study in the
    folder's own database) the old study and its outputs move into OUTPUT/replaced-<date>/ first."""
    cfg.placement()  # a bad --devices fails here, before anything is written
    out = Path(cfg.output)
    made = not out.exists()
    db = out / OWN_DB
    new_db = cfg.own_storage and not db.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _LocalLock(cfg):  # create it, and enqueue the flat trial, before any worker starts
            try:
                study = open_study(cfg, seed=0, announce=True)  # this process samples nothing with it
            except identity.IdentityMismatch:
                if not (force and cfg.own_storage):
                    raise
                identity.move_aside(out, [out / name for name in OUTPUTS])
                study = open_study(cfg, seed=0, announce=True)
    except Exception:  # e.g. --storage holds another study: leave no empty run folder behind
        if new_db:  # nor the database this attempt made (combine and report then read the trial files)
            for path in (db, db.with_name(OWN_DB + "-journal")):
                path.unlink(missing_ok=True)
        if made:
            (out / ".search.lock").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()  # only if nothing else (a study.db) is in it
        raise
    write_json(out / "search.json", {"storage": OWN_DB if cfg.own_storage else cfg.storage,
                                     "study_name": cfg.study_name, "tasks": cfg.tasks,
                                     "identity": cfg.identity()})
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


def objective_se(trial) -> float:
    """The standard error of a trial's objective (NaN when it is not the paper's or was not recorded)."""
    res = trial.user_attrs.get("results", {})
    return res.get("objective_se", math.nan) if res.get("objective") == trial.value else math.nan


def format_trials(study: optuna.Study, limit: int = 10) -> str:
    """The best trials with their objective's standard error, and how the best compares with the flat
    baseline: a gap within about two standard errors is noise, not a better distribution. Tasks a trial
    did not learn are named (stats.unlearned), and a flat baseline that does not learn a task is warned
    about: the search then has no forgetting of it to reduce."""
    trials = completed_trials(study)
    rows = next((t.user_attrs["results"].get("eval_samples") for t in trials if "results" in t.user_attrs), None)
    n = f"n = {', '.join(f'{k} {v}' for k, v in rows.items())} rows" if rows else "n rows not recorded"
    lines = [f"study {study.study_name}: {len(trials)} complete, "
             f"{count(study, (TrialState.PRUNED,))} pruned, {count(study, (TrialState.FAIL,))} failed "
             f"(scored on a held-out slice of the train split, {n})",
             f"{'trial':>5} {'objective ± se':>17}  {'forgetting':>10}  lrs (per region; - = empty region)"]
    for t in trials[:limit]:
        res = t.user_attrs.get("results", {})
        lrs = " ".join("   -   " if v is None else f"{v:.1e}" for v in res.get("lrs", []))
        note = "  (flat baseline)" if t.user_attrs.get("baseline") else ""
        bad = stats.unlearned(res)
        note += f"  (not learned: {', '.join(bad)})" if bad else ""
        lines.append(f"{t.number:>5} {pm(t.value, objective_se(t)):>17}  "
                     f"{res.get('mean_forgetting', math.nan):>+10.4f}  {lrs}{note}")
    if any(stats.unlearned(t.user_attrs.get("results", {})) for t in trials[:limit]):
        lines.append(f"not learned: {stats.UNLEARNED_RULE}; the forgetting of such a task means nothing")
    flat = [t for t in trials if t.user_attrs.get("baseline")]
    if trials and flat and trials[0] is not flat[0]:
        gap = trials[0].value - flat[0].value
        se = sum_se(objective_se(trials[0]), objective_se(flat[0]))
        verdict = ("within noise of" if not math.isnan(se) and abs(gap) < 2 * se else "above") if gap >= 0 else "below"
        lines.append(f"best trial {trials[0].number} vs flat baseline: {gap:+.4f} ± {se:.4f} ({verdict} the flat one)")
    if flat and stats.unlearned(flat[0].user_attrs.get("results", {})):
        lines.append(f"warning: the flat baseline did not learn {stats.unlearned_details(flat[0].user_attrs['results'])}"
                     f"; its forgetting means nothing, so no distribution can be shown to reduce it: choose tasks "
                     f"or a recipe it learns (benchmarks/recipe_probe.py)")
    return "\n".join(lines)
