"""Sequential fine-tuning over GLUE tasks, with forgetting metrics (Kenneweg et al. 2024's experiment).

One encoder and one classification head per task on the [CLS] token. Tasks are trained in order; after
each, every task seen so far is evaluated with its own head: R[i][j] = accuracy on task j after training
task i. A ``SequentialRunner`` loads the tokenised data and the pretrained weights once and can run many
methods or distributions in a row (search trials), restoring the weights from memory each time.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lrdist import data as glue
from lrdist import identity, precision, stats
from lrdist.files import write_atomic, write_json
from lrdist.methods import Method
from lrdist.optim import FusedRegionAdamW
from lrdist.regions import assign_regions, param_groups


DEFAULT_TASKS = "sst2,qqp"  # measured to learn and forget on a CPU (benchmarks/SCIENCE.md)
POOLINGS = ("cls", "mean")
EVAL_ON = ("validation", "heldout")
PRECISIONS = ("auto", "fp32", "bf16")


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")


@dataclass
class Recipe:
    """How each task is trained. ``paper`` follows Kenneweg et al. 2024; ``fast`` (the defaults) suits a CPU.

    The fast defaults were measured (benchmarks/SCIENCE.md, "Choosing the defaults"): with them the flat
    baseline learns SST-2 and QQP well above their majority class on 2 CPU cores in about two minutes a run,
    and forgets SST-2 after QQP, so there is something for a distribution to save.
    """

    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-4                  # flat LR, and the base that scale distributions multiply
    max_length: int = 128
    warmup_ratio: float = 0.1         # cosine schedule with warm-up, rebuilt for every task
    weight_decay: float = 0.0         # the paper uses Adam without weight decay
    keep_optimizer_state: bool = True
    max_train_samples: int | None = 1024
    max_eval_samples: int | None = 500
    eval_batch_size: int = 64
    scheme: str = "bert10"
    seed: int = 0
    pooling: str = "mean"             # all-MiniLM-L6-v2 was trained with mean pooling
    eval_on: str = "validation"       # or "heldout": a slice of train (what a search scores on)
    heldout_samples: int = 500        # train rows set aside for "heldout" (at most a fifth of the split)
    precision: str = "auto"           # "auto": bf16 autocast on CUDA, fp32 on CPU; "fp32"; "bf16" on any device
    length_buckets: int = 0           # > 1: training batches of similar length, sorted within windows of this
                                      # many batches (less padding); 0: plain shuffled batches

    def __post_init__(self):
        check_pooling(self.pooling)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.length_buckets < 0:
            raise ValueError(f"length_buckets must be >= 0, got {self.length_buckets}")
        if self.eval_on not in EVAL_ON:
            raise ValueError(f"unknown eval_on {self.eval_on!r}; choose from {', '.join(EVAL_ON)}")
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for all rows), got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")



RECIPES = {
    "fast": Recipe(),
    "paper": Recipe(epochs=3, batch_size=4, lr=2e-5, max_length=256, max_train_samples=None,
                    max_eval_samples=None, pooling="cls"),
}


def recipe_from(name: str = "fast", **overrides) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


class TaskHeads(nn.Module):
    """A shared encoder with one linear head per task, on the [CLS] token or the mean of the tokens.

    The paper's BERT classifies from [CLS]; sentence encoders such as all-MiniLM-L6-v2 were trained
    with mean pooling, and learn far faster from it.
    """

    def __init__(self, encoder: nn.Module, tasks: list[str], pooling: str = "cls"):
        super().__init__()
        check_pooling(pooling)
        self.encoder = encoder
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, glue.task_spec(t).num_labels) for t in tasks})

    def forward(self, task: str, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        tokens = self.encoder(**inputs).last_hidden_state
        if self.pooling == "cls":
            return self.heads[task](tokens[:, 0])
        mask = inputs["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        return self.heads[task]((tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0))



def task_metrics(task: str, preds: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy, the task's GLUE metric): F1 for MRPC/QQP, Matthews for CoLA, else accuracy."""
    acc = (preds == labels).double().mean().item()
    metric = glue.task_spec(task).metric
    if metric == "f1":
        tp = ((preds == 1) & (labels == 1)).sum().item()
        fp = ((preds == 1) & (labels == 0)).sum().item()
        fn = ((preds == 0) & (labels == 1)).sum().item()
        return acc, 2 * tp / max(2 * tp + fp + fn, 1)
    if metric == "matthews":
        tp = ((preds == 1) & (labels == 1)).sum().item()
        tn = ((preds == 0) & (labels == 0)).sum().item()
        fp = ((preds == 1) & (labels == 0)).sum().item()
        fn = ((preds == 0) & (labels == 1)).sum().item()
        denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return acc, (tp * tn - fp * fn) / denom if denom else 0.0
    return acc, acc


def summarise(tasks: list[str], acc: list[list[float]], n_eval: list[int] | None = None) -> dict:
    """Forgetting per task, backward transfer and the paper's objective from the accuracy matrix.

    With ``n_eval`` (rows scored per task) every figure also gets its standard error (``*_se``): each
    accuracy is a binomial proportion, and sums and differences add their errors in quadrature
    (conservative for differences measured on the same rows).
    """
    last = len(tasks) - 1
    peak = {j: max(range(j, last), key=lambda k: acc[k][j]) for j in range(last)}  # when task j stood highest
    forgetting = {tasks[j]: acc[peak[j]][j] - acc[last][j] for j in range(last)}
    bwt = sum(acc[last][j] - acc[j][j] for j in range(last)) / last
    out = {"forgetting": forgetting, "mean_forgetting": sum(forgetting.values()) / last, "bwt": bwt,
           "objective": acc[last][0] + acc[last][last],
           "mean_final_accuracy": sum(acc[last]) / len(tasks)}
    if n_eval is not None:
        se = [[stats.binomial_se(v, n_eval[j]) if v is not None else None for j, v in enumerate(row)] for row in acc]
        out.update(
            accuracy_se_matrix=se,
            forgetting_se={tasks[j]: stats.sum_se(se[peak[j]][j], se[last][j]) for j in range(last)},
            mean_forgetting_se=stats.sum_se(*(stats.sum_se(se[peak[j]][j], se[last][j]) for j in range(last))) / last,
            bwt_se=stats.sum_se(*(stats.sum_se(se[last][j], se[j][j]) for j in range(last))) / last,
            objective_se=stats.sum_se(se[last][0], se[last][last]),
            mean_final_accuracy_se=stats.sum_se(*se[last]) / len(tasks))
    return out


def resolve_device(device: str | None) -> torch.device:
    """The device asked for, checked before anything starts (never a silent CPU run); else CUDA if present."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}); "
                             f"use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return dev


def intermediate_value(i: int, tasks: list[str], accuracy) -> float:
    """What a run reports after each epoch of task ``i`` (``accuracy(task)`` evaluates one task): half
    the first task's accuracy during the first task, then first + current task accuracy."""
    first = accuracy(tasks[0])
    return 0.5 * first if i == 0 else first + accuracy(tasks[i])


class SequentialRunner:
    """Loads the model, tokenizer and data once; ``run`` trains a method over the tasks in order."""

    def __init__(self, model: str, tasks, recipe: Recipe | None = None, data_dir=None, device=None,
                 backend: str = "auto", progress: bool = True):
        from transformers import AutoModel, AutoTokenizer
        self.tasks = glue.parse_tasks(tasks)
        self.recipe = recipe or Recipe()
        self.model_id = str(model)
        self.data_dir = data_dir
        self.device = resolve_device(device)
        self.progress = progress
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        r = self.recipe
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_id)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.train = {t: glue.encode(self.tokenizer, t, "train", r.max_length, r.max_train_samples, data_dir,
                                     heldout_samples=r.heldout_samples) for t in self.tasks}
        # What runs are scored on: the validation split, or (search) the held-out slice of train.
        self.eval = {t: glue.encode(self.tokenizer, t, glue.task_spec(t).eval_split if r.eval_on == "validation"
                                    else glue.HELDOUT, r.max_length, r.max_eval_samples, data_dir,
                                    heldout_samples=r.heldout_samples) for t in self.tasks}

        torch.manual_seed(r.seed)  # head initialisation
        self.model = TaskHeads(AutoModel.from_pretrained(self.model_id), self.tasks, r.pooling).to(self.device)
        self.initial_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.regions = assign_regions(self.model, r.scheme)
        self.backend = backend
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> FusedRegionAdamW:
        """One optimizer over the model's trainable parameters, one group per region."""
        r = self.recipe
        return FusedRegionAdamW(param_groups(self.model, r.scheme, weight_decay=r.weight_decay), lr=r.lr,
                                weight_decay=r.weight_decay, region_scales=[1.0] * self.regions.num_regions,
                                backend=self.backend)

    # ---- pieces ----------------------------------------------------------------------------------
    def _bf16(self) -> bool:
        wanted = self.recipe.precision
        return wanted == "bf16" or (wanted == "auto" and self.device.type == "cuda")

    @contextlib.contextmanager
    def _autocast(self):
        """Forward passes: bf16 autocast where the recipe asks for it, its GEMMs as lrdist.precision says."""
        bf16 = self._bf16()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16), \
                precision.bf16_gemms(self.device, bf16):
            yield

    def _gemm_way(self) -> str | None:
        """How this run's bf16 GEMMs run on a CPU (lrdist.precision), or None where nothing runs them."""
        return precision.cpu_bf16_gemm() if self._bf16() and self.device.type == "cpu" else None

    def _backward(self, loss: torch.Tensor) -> None:
        with precision.bf16_gemms(self.device, self._bf16()):  # the backward's GEMMs run as the forward's
            loss.backward()

    def _loss(self, task: str, batch: dict) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self._autocast():
            logits = self.model(task, batch)
        return nn.functional.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def evaluate(self, task: str) -> tuple[float, float]:
        self.model.eval()
        preds, labels = [], []
        for batch in self.eval[task].batches(self.recipe.eval_batch_size, self.pad_id, by_length=True):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self._autocast():
                preds.append(self.model(task, batch).argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        return task_metrics(task, torch.cat(preds), torch.cat(labels))

    def _score(self, task: str) -> tuple[float, float]:
        """``evaluate(task)``, kept in ``_scores`` until the weights change (the next epoch)."""
        if task not in self._scores:
            self._scores[task] = self.evaluate(task)
        return self._scores[task]

    def _grad_batches(self, task: str):
        """For EWC's Fisher: yields once per training batch with that batch's gradient in .grad."""
        def gen(limit=None):
            self.model.eval()
            for k, batch in enumerate(self.train[task].batches(self.recipe.batch_size, self.pad_id)):
                if limit is not None and k >= limit:
                    break
                self.optimizer.zero_grad(set_to_none=True)
                self._backward(self._loss(task, batch))
                yield
            self.optimizer.zero_grad(set_to_none=True)
        return gen

    def reset(self, method: Method, seed: int) -> list[float]:
        """Fresh pretrained weights and optimizer state; the method's LRs into the region table."""
        self.model.load_state_dict(self.initial_state)
        if seed != self.recipe.seed:  # other heads for another seed; the encoder stays pretrained
            torch.manual_seed(seed)
            for head in self.model.heads.values():
                head.reset_parameters()
        self.seed = seed
        self._scores = {}
        self.optimizer.reset_state()
        lrs = method.region_lrs(self.recipe.lr, self.regions.num_regions)
        self.optimizer.set_region_scales([lr / self.recipe.lr for lr in lrs])
        # An empty region (no parameters in this model) has no LR to report.
        return [None if region in self.regions.empty else lr for region, lr in enumerate(lrs)]

    # ---- the run ---------------------------------------------------------------------------------
    def run(self, method: Method, output: str | os.PathLike | None = None, resume: bool = False,
            stop_after: int | None = None, report=None, seed: int | None = None,
            keep_checkpoint: bool = False) -> dict:
        """Train ``method`` over the tasks in order and return the results (also ``output/results.json``).

        ``report(step, value)`` (optional) is called after every epoch with an intermediate objective:
        half the first task's accuracy during the first task, then first + current task accuracy.
        ``stop_after`` ends the run after that many tasks, as an interruption would (``resume`` goes on).
        A finished run deletes its checkpoint (as large as the model) unless ``keep_checkpoint``.
        """
        r, tasks = self.recipe, self.tasks
        seed = r.seed if seed is None else seed
        config = {"model": self.model_id, "tasks": tasks, "recipe": asdict(r), "seed": seed, **method.describe()}
        lrs = self.reset(method, seed)
        out = Path(output) if output is not None else None
        ckpt_path = out / "checkpoint.pt" if out is not None else None
        if out is not None:  # a checkpoint resumes only a run of the same model and data by content
            config["identity"] = {k: v for k, v in self.identity(method, seed).items() if k != "versions"}
        acc, metric, seconds = [], [], []
        start = 0
        plain_optimizer = self.optimizer
        if method.adapts_encoder:  # e.g. LoRA: a wrapped encoder and an optimizer over what trains
            torch.manual_seed(seed)  # the adapters' initialisation
            self.model.encoder = method.wrap_encoder(self.model.encoder).to(self.device)
            self.optimizer = self._make_optimizer()
            self.optimizer.set_region_scales(plain_optimizer.region_scales.cpu())
        method.attach(self.model, self.model.encoder, self.optimizer)
        try:
            if resume and ckpt_path is not None and ckpt_path.exists():
                ckpt = torch.load(ckpt_path, map_location=self.device, weights_only=False)
                if ckpt["config"] != config:
                    raise ValueError(f"the checkpoint in {out} is for a different run "
                                     f"({identity.first_difference(ckpt['config'], config)} differs); "
                                     f"use another --output or drop --resume")
                self.model.load_state_dict(ckpt["model"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
                method.load_state_dict(ckpt["method"])
                acc, metric, seconds, start = ckpt["acc"], ckpt["metric"], ckpt["seconds"], ckpt["next_task"]
                if ckpt.get("gemm") != self._gemm_way():  # the tasks left run their bf16 GEMMs another way
                    identity.warn(f"the checkpoint in {out}", f"cpu_bf16_gemm {ckpt.get('gemm') or 'missing'} "
                                                              f"then, {self._gemm_way() or 'none'} now")
                print(f"resuming from {ckpt_path}: {start} of {len(tasks)} tasks done")
            step = sum(r.epochs for _ in range(start))
            for i in range(start, len(tasks)):
                t0 = time.perf_counter()
                self._train_task(i, method, report, step)
                step += r.epochs
                # Scored before after_task, which only measures (EWC's Fisher): the last report's
                # evaluations are of these very weights, so they are reused, not run again.
                row = [self._scores.get(t) or self.evaluate(t) for t in tasks[: i + 1]]
                method.after_task(self.model.encoder, self._grad_batches(tasks[i]))
                acc.append([a for a, _ in row])
                metric.append([m for _, m in row])
                seconds.append(time.perf_counter() - t0)
                if ckpt_path is not None:
                    _save_atomic({"config": config, "next_task": i + 1, "model": self.model.state_dict(),
                                  "optimizer": self.optimizer.state_dict(), "method": method.state_dict(),
                                  "acc": acc, "metric": metric, "seconds": seconds, "gemm": self._gemm_way()},
                                 ckpt_path)
                if stop_after is not None and i + 1 >= stop_after and i + 1 < len(tasks):
                    return {"status": "stopped", "tasks_done": i + 1, **config}
        finally:
            method.detach()
            if method.adapts_encoder:
                self.model.encoder = method.unwrap_encoder(self.model.encoder)
                self.optimizer = plain_optimizer

        results = self.results(method, seed, lrs, acc, metric, seconds)
        if out is not None:
            write_json(out / "results.json", {**results, "identity": self.identity(method, seed)})
            if not keep_checkpoint:  # the results are safe: the checkpoint is no longer needed
                ckpt_path.unlink(missing_ok=True)
        return results

    def results(self, method: Method, seed: int, lrs: list[float], acc, metric, seconds) -> dict:
        """A run's results from its accuracy and metric rows (one row per finished task)."""
        r, tasks = self.recipe, self.tasks
        return {
            "tasks": tasks, "method": method.name, "method_config": method.describe(), "model": self.model_id,
            "recipe": asdict(r), "seed": seed, "scheme": r.scheme, "region_labels": list(self.regions.labels),
            "lrs": lrs,
            "accuracy_matrix": [row + [None] * (len(tasks) - len(row)) for row in acc],
            "metrics_matrix": [row + [None] * (len(tasks) - len(row)) for row in metric],
            "metric_names": [glue.task_spec(t).metric for t in tasks],
            **summarise(tasks, acc, [len(self.eval[t]) for t in tasks]),
            "eval_on": r.eval_on, "method_stats": method.stats(),
            "task_seconds": seconds, "total_seconds": sum(seconds),
            "train_samples": {t: len(self.train[t]) for t in tasks},
            "eval_samples": {t: len(self.eval[t]) for t in tasks},
            # what always predicting the most frequent class scores on the same rows (see stats.unlearned)
            "majority_rate": {t: stats.majority_rate(self.eval[t].labels.tolist()) for t in tasks},
        }

    def identity(self, method: Method, seed: int) -> dict:
        """What a stored run of ``method`` with ``seed`` was made from (lrdist.identity)."""
        return identity.make(self.model_id, self.tasks, self.recipe, self.data_dir, self.device,
                             method=identity.method_settings(method, self.recipe), seed=seed)

    def start_task(self, i: int, optimizer) -> tuple[torch.Generator, object, int]:
        """Seeding, optimizer state and schedule at the start of task ``i``: (batch order, scheduler, steps).

        Shared with the batched trainer (lrdist/batched.py), so K replicas see what K runs would."""
        r = self.recipe
        torch.manual_seed(self.seed * 1000 + i)  # dropout: the same whether or not the run was resumed
        order = torch.Generator().manual_seed(self.seed * 1000 + i)
        if not r.keep_optimizer_state:
            optimizer.reset_state()
        total = r.epochs * math.ceil(len(self.train[self.tasks[i]]) / r.batch_size)
        for group in optimizer.param_groups:  # the schedule starts again for every task
            group["lr"] = group["initial_lr"] = r.lr
        from transformers import get_cosine_schedule_with_warmup
        return order, get_cosine_schedule_with_warmup(optimizer, int(r.warmup_ratio * total), total), total

    def _train_task(self, i: int, method: Method, report, step: int) -> None:
        r, task = self.recipe, self.tasks[i]
        order, scheduler, total = self.start_task(i, self.optimizer)
        method.before_task(i)
        bar = tqdm(total=total, desc=f"task {i + 1}/{len(self.tasks)} {task}", disable=not self.progress,
                   leave=False)
        for epoch in range(r.epochs):
            bar.set_postfix(epoch=f"{epoch + 1}/{r.epochs}")
            self._scores = {}  # the weights change from here on
            self.model.train()
            for batch in self.train[task].batches(r.batch_size, self.pad_id, shuffle=True, generator=order,
                                                  buckets=r.length_buckets):
                loss = self._loss(task, batch)
                self._backward(loss)
                method.after_backward(self.model.encoder)
                self.optimizer.step()
                scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                bar.update()
                if bar.n % 10 == 0:
                    bar.set_postfix(epoch=f"{epoch + 1}/{r.epochs}", loss=f"{loss.item():.3f}")
            if report is not None:
                report(step + epoch, intermediate_value(i, self.tasks, lambda t: self._score(t)[0]))
        bar.close()


def _save_atomic(obj, path: Path) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


def format_results(res: dict) -> str:
    """The accuracy matrix (each value ± its standard error) and the derived fields as a plain-text table."""
    tasks = res["tasks"]
    width = max(16, *(len(t) for t in tasks))
    se = res.get("accuracy_se_matrix") or [[None] * len(tasks) for _ in tasks]
    lines = [f"method: {res['method']}   model: {Path(res['model']).name}   seed: {res['seed']}   "
             f"scored on: {res.get('eval_on', 'validation')} ({', '.join(f'{t} {n} rows' for t, n in res['eval_samples'].items())})",
             "accuracy ± standard error (row: after training task, column: evaluated task)",
             " " * 14 + "".join(f"{t:>{width + 2}}" for t in tasks)]
    for i, row in enumerate(res["accuracy_matrix"]):
        cells = "".join(f"{'' if v is None else stats.pm(v, e):>{width + 2}}" for v, e in zip(row, se[i]))
        lines.append(f"after {tasks[i]:<8}" + cells)
    names = res["metric_names"]
    final = res["metrics_matrix"][-1]
    lines.append("final " + ", ".join(f"{t} {n} {v:.4f}" for t, n, v in zip(tasks, names, final)))
    bad = stats.unlearned(res)
    lines.append("forgetting " + ", ".join(f"{t} {v:+.4f}{' (not learned)' if t in bad else ''}"
                                           for t, v in res["forgetting"].items())
                 + f"   bwt {res['bwt']:+.4f}   objective {stats.pm(res['objective'], res.get('objective_se'))}")
    if bad:
        lines.append(stats.unlearned_note(res))
    for key, value in (res.get("method_stats") or {}).items():
        lines.append(f"{key}: {value}")
    lines.append("time per task " + ", ".join(f"{s:.1f}s" for s in res["task_seconds"]))
    return "\n".join(lines)
