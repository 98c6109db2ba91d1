"""The Hugging Face Trainer with FusedRegionAdamW under DDP: a real ``torchrun --nproc_per_node 2`` job on CPU.

The job (this file, run by torchrun) trains a tiny random BERT three times with the Trainer's DDP (gloo):
with ``optimizer_cls_and_kwargs=lrdist.hf.trainer_optimizer(...)`` (the route that also works with FSDP,
where the Trainer refuses ``optimizers=``), with ``torch.optim.AdamW`` with one group per region handed
over as ``optimizers=``, and resumed from the first run's mid-way checkpoint. The tests compare the
params. (Accelerate turns FSDP on only with accelerators, so Trainer + FSDP needs GPUs; the factory's
build on an FSDP2-sharded model is tested in test_distributed.py.)
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lrdist.hf import NO_DECAY, trainer_optimizer  # noqa: E402
from lrdist.regions import param_groups  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SCALES = [0.5, 1.5, 0.7, 1.2, 1.0, 0.9, 1.1, 0.8, 1.3, 2.0]
LR, WD, VOCAB = 1e-3, 0.01, 64


def tiny_bert():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))


def rows(n=32, seed=1) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (8,), generator=gen),
             "labels": int(torch.randint(0, 3, (), generator=gen))} for _ in range(n)]


def job(out: pathlib.Path) -> None:
    rank = int(os.environ["RANK"])
    data = rows()

    def trainer(folder, model=None, **optimizer):
        args = transformers.TrainingArguments(
            output_dir=str(out / folder), max_steps=4, per_device_train_batch_size=4, save_strategy="steps",
            save_steps=2, logging_steps=1, max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=1, seed=0,
            use_cpu=True, ddp_backend="gloo", report_to=[], disable_tqdm=True, dataloader_num_workers=0)
        return transformers.Trainer(model=model or tiny_bert(), args=args, train_dataset=data, **optimizer)

    def reference():
        model = tiny_bert()
        groups = param_groups(model, "bert10", weight_decay=WD, no_decay=NO_DECAY)
        for g in groups:
            g["lr"] = LR * SCALES[g.pop("region")]
        return model, torch.optim.AdamW(groups, lr=LR)

    ours = trainer("ours", optimizer_cls_and_kwargs=trainer_optimizer("bert10", lr=LR, region_scales=SCALES,
                                                                      weight_decay=WD))
    ours.train()
    model, adamw = reference()
    theirs = trainer("theirs", model, optimizers=(adamw, None))
    theirs.train()
    resumed = trainer("ours", optimizer_cls_and_kwargs=trainer_optimizer("bert10", lr=LR, weight_decay=WD))
    resumed.train(resume_from_checkpoint=str(out / "ours" / "checkpoint-2"))  # (built with default scales)

    results = {name: {n: p.detach().clone() for n, p in t.model.named_parameters()}
               for name, t in (("ours", ours), ("theirs", theirs), ("resumed", resumed))}
    results["world"] = torch.distributed.get_world_size()
    results["optimizer"] = type(ours.optimizer.optimizer).__name__
    results["resumed-scales"] = resumed.optimizer.optimizer.region_scales.tolist()
    results["steps"] = [t.state.global_step for t in (ours, theirs, resumed)]
    results["lrs"] = [h["learning_rate"] for h in ours.state.log_history if "learning_rate" in h]
    torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer-ddp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          __file__, "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_trainer_ddp_with_the_factory_matches_adamw_per_region_and_resumes(results):
    initial = dict(tiny_bert().named_parameters())
    for res in results:
        assert res["world"] == 2 and res["optimizer"] == "FusedRegionAdamW" and res["steps"] == [4, 4, 4]
        assert max(res["lrs"]) <= LR and res["lrs"][-1] < max(res["lrs"])  # the Trainer's schedule drove our LR
        assert res["resumed-scales"] == SCALES  # restored from the checkpoint, not the defaults it was built with
        assert max((p - initial[n]).abs().max() for n, p in res["ours"].items()) > 1e-3  # it trained
        for n, p in res["ours"].items():
            torch.testing.assert_close(p, res["theirs"][n], rtol=0, atol=1e-5, msg=lambda m: f"{n}: {m}")
            torch.testing.assert_close(p, res["resumed"][n], rtol=0, atol=1e-6, msg=lambda m: f"{n}: {m}")
            torch.testing.assert_close(p, results[0]["ours"][n], rtol=0, atol=0)  # DDP replicas agree


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=pathlib.Path, required=True)
    job(parser.parse_args().out)


if __name__ == "__main__":
    main()
