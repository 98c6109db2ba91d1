"""A one-minute look at FusedRegionAdamW on a real model: per-region LRs and how far each region moved."""
from __future__ import annotations

import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lrdist import FusedRegionAdamW
from lrdist.methods import PAPER_ROUNDED  # the paper's combined distribution, rounded to scales
from lrdist.regions import assign_regions, param_groups, region_table
SENTENCES = [("a gripping, beautifully acted film", 1), ("dull and far too long", 0),
             ("one of the best of the year", 1), ("i wanted my two hours back", 0)]


def run_demo(model_id: str, steps: int = 5, backend: str = "auto", base_lr: float = 2e-5) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_id)
    model = AutoModelForSequenceClassification.from_pretrained(model_id, num_labels=2).to(device)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = FusedRegionAdamW(param_groups(model, "bert10"), lr=base_lr, weight_decay=0.0,
                           region_scales=PAPER_ROUNDED, backend=backend)
    batch = tok([s for s, _ in SENTENCES], padding=True, return_tensors="pt").to(device)
    labels = torch.tensor([y for _, y in SENTENCES], device=device)
    t0 = time.perf_counter()
    for step in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"step {step + 1}/{steps}  loss {loss.item():.4f}")
    elapsed = time.perf_counter() - t0

    rows = region_table(model, "bert10")
    rmap = assign_regions(model, "bert10")
    params = dict(model.named_parameters())
    for row in rows:
        names = rmap.names_in(row["region"])
        row["lr"] = base_lr * PAPER_ROUNDED[row["region"]]
        row["moved"] = (max((params[n].detach() - start[n]).abs().max().item() for n in names)
                        if names else float("nan"))
    print(f"\nFusedRegionAdamW ({backend}) on {device}: {steps} steps in {elapsed:.2f}s\n")
    print(f"{'region':>6}  {'label':<12} {'tensors':>7} {'params':>11} {'scale':>6} {'lr':>9} {'max|dw|':>9}")
    for r in rows:
        moved = f"{r['moved']:>9.2e}" if r["tensors"] else f"{'-':>9}"
        print(f"{r['region']:>6}  {r['label']:<12} {r['tensors']:>7} {r['params']:>11,} "
              f"{PAPER_ROUNDED[r['region']]:>6} {r['lr']:>9.2e} {moved}")
    return rows
