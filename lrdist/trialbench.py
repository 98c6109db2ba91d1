"""One search trial, our pipeline against a plain loop written the common way.

The plain loop is what a search script usually does in every trial: load the model from disk, tokenise
both tasks inside the trial with padding to the maximum length, build ``torch.optim.AdamW`` with one group
per region, train the tasks in order and evaluate. Ours loads and tokenises once per worker (amortised
over trials; its first-trial cost is reported separately), pads per batch, restores the weights from
memory and only rewrites the optimizer's region table.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from lrdist import data as glue
from lrdist.continual import Recipe, SequentialRunner, TaskHeads
from lrdist.methods import PAPER_COMBINED, Distribution
from lrdist.regions import assign_regions


def plain_trial(model_id: str, tasks: list[str], lrs: list[float], recipe: Recipe, data_dir,
                pad_to: int = 256) -> dict:
    from transformers import AutoModel, AutoTokenizer, get_cosine_schedule_with_warmup
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tok = AutoTokenizer.from_pretrained(model_id)
    model = TaskHeads(AutoModel.from_pretrained(model_id), tasks)
    region_of = assign_regions(model, recipe.scheme).region_of
    groups = {}
    for name, p in model.named_parameters():
        groups.setdefault(region_of[name], {"params": [], "lr": lrs[region_of[name]]})["params"].append(p)
    opt = torch.optim.AdamW(list(groups.values()), lr=recipe.lr, weight_decay=0.0)

    def load(task, split, cap):
        spec = glue.task_spec(task)
        ds = glue.load_split(task, split, data_dir)
        if cap is not None and cap < len(ds):
            ds = ds.shuffle(seed=0).select(range(cap))
        enc = tok(list(ds[spec.text_a]), list(ds[spec.text_b]) if spec.text_b else None, truncation=True,
                  max_length=pad_to, padding="max_length", return_tensors="pt")
        return torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                                              torch.tensor(list(ds["label"])))

    accuracy = {}
    samples = 0
    for i, task in enumerate(tasks):
        train = torch.utils.data.DataLoader(load(task, "train", recipe.max_train_samples), batch_size=recipe.batch_size,
                                            shuffle=True)
        total = recipe.epochs * len(train)
        sched = get_cosine_schedule_with_warmup(opt, int(recipe.warmup_ratio * total), total)
        model.train()
        for _ in range(recipe.epochs):
            for ids, mask, types, labels in train:
                batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
                loss = nn.functional.cross_entropy(model(task, batch), labels)
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad()
                samples += len(labels)
        model.eval()
        for seen in tasks[: i + 1]:
            ev = torch.utils.data.DataLoader(load(seen, glue.task_spec(seen).eval_split, recipe.max_eval_samples),
                                             batch_size=recipe.eval_batch_size)
            right = n = 0
            with torch.no_grad():
                for ids, mask, types, labels in ev:
                    pred = model(seen, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}).argmax(-1)
                    right += (pred == labels).sum().item()
                    n += len(labels)
            accuracy[(i, seen)] = right / n
    return {"seconds": time.perf_counter() - t0, "train_samples": samples, "accuracy": accuracy}


def run(model_id: str, tasks=("rte", "mrpc"), recipe: Recipe | None = None, data_dir=None, trials: int = 2,
        plain: bool = True) -> dict:
    recipe = recipe or Recipe(epochs=1, batch_size=8, max_train_samples=64, max_eval_samples=64)
    tasks = list(tasks)
    lrs = PAPER_COMBINED
    out = {"tasks": tasks, "recipe": recipe, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    t0 = time.perf_counter()
    runner = SequentialRunner(model_id, tasks, recipe, data_dir=data_dir, progress=False)
    load = time.perf_counter() - t0
    ours = []
    for _ in range(trials):
        t = time.perf_counter()
        runner.run(Distribution(lrs))
        ours.append(time.perf_counter() - t)
    samples = sum(min(recipe.max_train_samples or math.inf, len(runner.train[t])) for t in tasks) * recipe.epochs
    out.update(ours_load_s=load, ours_trial_s=sorted(ours)[len(ours) // 2], ours_first_trial_s=load + ours[0],
               ours_samples_per_s=samples / sorted(ours)[len(ours) // 2])
    if plain:
        runs = [plain_trial(model_id, tasks, lrs, recipe, data_dir) for _ in range(trials)]
        med = sorted(r["seconds"] for r in runs)[len(runs) // 2]
        out.update(plain_trial_s=med, plain_samples_per_s=runs[0]["train_samples"] / med,
                   speedup=med / out["ours_trial_s"], speedup_first_trial=med / out["ours_first_trial_s"])
    return out


def format_result(r: dict) -> str:
    rec = r["recipe"]
    lines = [f"trial: {'-'.join(r['tasks'])}, {rec.max_train_samples} train / {rec.max_eval_samples} eval rows per "
             f"task, batch {rec.batch_size}, {rec.epochs} epoch(s), on {r['device']}",
             "| pipeline | s per trial | train samples/s |", "|---|---|---|",
             f"| lrdist (data and weights loaded once) | {r['ours_trial_s']:.2f} | {r['ours_samples_per_s']:.1f} |",
             f"| lrdist, first trial incl. loading ({r['ours_load_s']:.1f} s) | {r['ours_first_trial_s']:.2f} | - |"]
    if "plain_trial_s" in r:
        lines.append(f"| plain loop (reload, tokenise, pad to 256, AdamW 10 groups) | {r['plain_trial_s']:.2f} | "
                     f"{r['plain_samples_per_s']:.1f} |")
        lines.append(f"\nspeed-up per trial: {r['speedup']:.2f}x (first trial included: {r['speedup_first_trial']:.2f}x)")
    return "\n".join(lines)
