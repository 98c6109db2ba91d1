"""Batched trials: K learning-rate distributions trained together, one forward/backward and one optimizer step.

K search trials of one model differ only in their LR distributions, so ``BatchedRunner`` trains K replicas
of a ``SequentialRunner``'s model on the same batches at once and returns what K ``runner.run`` calls
would. How:

* **Replicas.** ``torch.func.stack_module_state`` stacks the K copies of every parameter into one leaf
  ``[K, ...]``; ``vmap(functional_call(runner.model, ...), randomness="different")`` runs them in one
  forward (each linear layer becomes one batched matmul, and every replica draws its own dropout), and
  one backward of the summed per-replica losses fills each leaf's ``.grad`` (replica k's rows hold exactly
  replica k's gradient, as the replicas share nothing).
* **One optimizer.** ``FusedRegionAdamW`` steps per-replica *views* ``stacked[k]`` of the leaves, in
  param groups copied from the runner's optimizer with region ``k * R + r``: the region table holds K x R
  scales, so the Triton path still steps every tensor of every replica in one launch. Views rather than
  one stacked tensor per parameter because the kernel gives each tensor one region, and a replica's
  tensors then keep their own region, group and state exactly as in a single run. The views' storage
  never moves, so their addresses and their moments stay put and the optimizer's device tables are
  cached; after backward each view's ``.grad`` is pointed at ``stacked.grad[k]`` (no copy). As in the
  sequential loop grads are set to None after each step, so tensors that a task does not reach (other
  tasks' heads) get no update.
* **Reuse.** Weights, data, batching, seeding, the schedule (``runner.start_task``), metrics and the
  results dict are the runner's own, so with dropout off the K replicas' accuracy matrices and weights
  equal K separate runs (tests/test_batched.py) up to the last bits of batched matmuls.
* **Pruning.** ``report(k, step, value)`` is called per replica after each epoch with the same value
  ``SequentialRunner.run`` reports; when it returns True replica k is pruned: its region scales go to 0
  and its views get no ``.grad`` any more, so the optimizer skips them and their moments and step count
  stop; the forward, backward and evaluations then run on the remaining replicas only (an index_select of
  the stacked leaves). The run ends early when every replica is pruned.

In bf16 the replicas match runs at the level of bf16 rounding, not bit for bit: inside vmap torch's
autocast decomposes a linear layer into a bf16 batched matmul plus an fp32 bias add, so its output stays
fp32 where a run's is bf16 (tests/test_batched.py checks both the cause and the size of the effect).

Only LR-only methods (flat, dist, llrd) batch: EWC and MIGU hook into the loop per model. A batched run
keeps no checkpoint of its own: in a search, trials of a killed worker are re-queued and start afresh,
as single trials are. ``task_seconds`` of each result is the wall time of the whole batch.
"""
from __future__ import annotations

import time
import warnings

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from lrdist.continual import SequentialRunner, intermediate_value, task_metrics
from lrdist.methods import Method
from lrdist.optim import FusedRegionAdamW

# On a CPU, SDPA has no vmap rule and runs per replica (correct, and still one autograd graph).
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented "
                        "the batching rule")

_HOOKS = ("attach", "before_task", "after_backward", "after_task")


def check_methods(methods, num_regions: int, base_lr: float) -> list[list[float]]:
    """Each method's region LRs; a clear error for anything that cannot be batched."""
    if not isinstance(methods, (list, tuple)) or not methods:
        raise ValueError("a batched run needs a non-empty list of methods (one per replica)")
    lrs = []
    for k, m in enumerate(methods):
        if not isinstance(m, Method):
            raise TypeError(f"replica {k}: expected a Method such as Distribution(lrs), got {type(m).__name__}")
        hooked = [h for h in _HOOKS if getattr(type(m), h) is not getattr(Method, h)]
        if hooked:
            raise ValueError(f"replica {k}: method {m.name!r} hooks into the loop ({', '.join(hooked)}); only "
                             f"LR-only methods (flat, dist, llrd) can be batched: run it with SequentialRunner")
        lrs.append(m.region_lrs(base_lr, num_regions))  # checks length and values
    return lrs


class BatchedRunner:
    """Trains K replicas of ``runner``'s model at once; ``run(methods)`` equals ``[runner.run(m) ...]``."""

    def __init__(self, runner: SequentialRunner):
        self.runner = runner

    # ---- set-up ----------------------------------------------------------------------------------
    def _build(self, methods: list[Method], lrs: list[list[float]], seed: int):
        """Stacked leaves, per-replica views and the optimizer over K x R regions."""
        run, r = self.runner, self.runner.recipe
        run.reset(methods[0], seed)  # pretrained weights; heads re-drawn for another seed
        model, K, R = run.model, len(lrs), run.regions.num_regions
        stacked, _ = stack_module_state([model] * K)  # leaves [K, ...] that require grad
        data = {n: t.detach() for n, t in stacked.items()}  # same storage, leaves the optimizer may own
        views = [{n: d[k] for n, d in data.items()} for k in range(K)]
        name_of = {p: n for n, p in model.named_parameters()}
        base = run.optimizer
        groups = []
        for k in range(K):
            for g in base.param_groups:
                extra = {key: v for key, v in g.items() if key not in ("params", "region", "lr", "initial_lr")}
                groups.append({**extra, "params": [views[k][name_of[p]] for p in g["params"]],
                               "region": k * R + g["region"]})
        scales = [lr / r.lr for replica in lrs for lr in replica]
        opt = FusedRegionAdamW(groups, lr=r.lr, weight_decay=base.defaults["weight_decay"], region_scales=scales,
                               backend=base.backend, block_size=base.block_size, max_grad_norm=base.max_grad_norm)
        return stacked, views, opt, scales

    # ---- forward, step, evaluation ----------------------------------------------------------------
    def _logits(self, task: str, batch: dict, params: dict) -> torch.Tensor:
        """[replicas, batch, labels] logits of the replicas whose stacked parameters are ``params``."""
        model = self.runner.model

        def one(p):
            return functional_call(model, p, (task, batch))
        with self.runner._autocast():
            return vmap(one, randomness="different")(params)

    @staticmethod
    def _select(stacked: dict, active: list[int], K: int) -> dict:
        if len(active) == K:
            return stacked
        idx = torch.tensor(active, device=next(iter(stacked.values())).device)
        return {n: t.index_select(0, idx) for n, t in stacked.items()}

    def _batch(self, batch: dict) -> dict:
        return {k: v.to(self.runner.device, non_blocking=True) for k, v in batch.items()}

    def _train_step(self, task, batch, stacked, views, active, opt) -> None:
        batch = self._batch(batch)
        logits = self._logits(task, batch, self._select(stacked, active, len(views))).float()
        # Per replica, as the sequential loop computes its loss; their sum's gradient is each one's own.
        self.runner._backward(torch.stack([nn.functional.cross_entropy(logits[j], batch["labels"])
                                           for j in range(len(active))]).sum())
        for k in active:
            for n, t in stacked.items():
                views[k][n].grad = None if t.grad is None else t.grad[k]
        opt.step()

    def _zero_grad(self, stacked, opt) -> None:
        opt.zero_grad(set_to_none=True)
        for t in stacked.values():
            t.grad = None

    @torch.no_grad()
    def _evaluate(self, task: str, stacked: dict, active: list[int], K: int) -> dict:
        """{replica: (accuracy, metric)} on the split runs are scored on."""
        run = self.runner
        run.model.eval()
        params = self._select(stacked, active, K)
        preds, labels = [[] for _ in active], []
        for batch in run.eval[task].batches(run.recipe.eval_batch_size, run.pad_id, by_length=True):
            batch = self._batch(batch)
            logits = self._logits(task, batch, params)
            for j in range(len(active)):
                preds[j].append(logits[j].argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        labels = torch.cat(labels)
        return {k: task_metrics(task, torch.cat(preds[j]), labels) for j, k in enumerate(active)}

    # ---- the run ---------------------------------------------------------------------------------
    def run(self, methods: list[Method], report=None, seed: int | None = None) -> list[dict]:
        """Train one replica per method over the tasks; a list of results in the order of ``methods``.

        A finished replica's result is what ``runner.run(method, seed=seed)`` returns. ``report(k, step,
        value)`` (optional) gets each replica's intermediate value after every epoch; returning True prunes
        replica k, whose result is then ``{"status": "pruned", "step": step, "lrs": ...}``.
        """
        run, r, tasks = self.runner, self.runner.recipe, self.runner.tasks
        lrs = check_methods(methods, run.regions.num_regions, r.lr)
        seed = r.seed if seed is None else seed
        K, R = len(methods), run.regions.num_regions
        stacked, views, opt, scales = self._build(methods, lrs, seed)
        active = list(range(K))
        pruned: dict[int, int] = {}
        acc, metric, seconds = [[] for _ in range(K)], [[] for _ in range(K)], []
        step = 0
        for i, task in enumerate(tasks):
            t0 = time.perf_counter()
            order, scheduler, _ = run.start_task(i, opt)
            for epoch in range(r.epochs):
                run.model.train()
                for batch in run.train[task].batches(r.batch_size, run.pad_id, shuffle=True, generator=order,
                                                     buckets=r.length_buckets):
                    self._train_step(task, batch, stacked, views, active, opt)
                    scheduler.step()
                    self._zero_grad(stacked, opt)
                if report is not None:
                    scored = {}

                    def accuracy(t, k):
                        if t not in scored:
                            scored[t] = self._evaluate(t, stacked, active, K)
                        return scored[t][k][0]
                    for k in list(active):
                        if report(k, step + epoch, intermediate_value(i, tasks, lambda t: accuracy(t, k))):
                            pruned[k] = step + epoch
                            active.remove(k)
                            scales[k * R:(k + 1) * R] = [0.0] * R  # its grads stay None: no update, moments kept
                            opt.set_region_scales(scales)
                if not active:
                    break
            step += r.epochs
            if not active:
                break
            rows = {t: self._evaluate(t, stacked, active, K) for t in tasks[: i + 1]}
            for k in active:
                acc[k].append([rows[t][k][0] for t in tasks[: i + 1]])
                metric[k].append([rows[t][k][1] for t in tasks[: i + 1]])
            seconds.append(time.perf_counter() - t0)
        self.weights = [{n: t[k] for n, t in stacked.items()} for k in range(K)]  # for tests and inspection
        shown = [[None if reg in run.regions.empty else lr for reg, lr in enumerate(x)] for x in lrs]  # as run()
        return [{"status": "pruned", "step": pruned[k], "lrs": shown[k]} if k in pruned else
                run.results(methods[k], seed, shown[k], acc[k], metric[k], list(seconds)) for k in range(K)]

