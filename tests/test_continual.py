"""Real sequential runs: the offline MiniLM on the shared GLUE copy, on small caps."""
import json

import pytest

from lrdist.cli import main
from lrdist.continual import Recipe, SequentialRunner, summarise
from lrdist.methods import EWC, MIGU, Distribution, Flat

TINY = Recipe(epochs=1, batch_size=8, max_length=64, max_train_samples=24, max_eval_samples=32)


@pytest.fixture(scope="module")
def runner(minilm_path, glue_dir):
    return SequentialRunner(minilm_path, "rte,mrpc", TINY, data_dir=glue_dir, progress=False)


def test_two_task_run_fields_follow_from_the_matrix(runner, tmp_path):
    res = runner.run(Flat(), output=tmp_path)
    acc = res["accuracy_matrix"]
    assert acc[0][1] is None and all(0.0 <= v <= 1.0 for v in (acc[0][0], acc[1][0], acc[1][1]))
    # the accuracies come from real evaluations: 32 rows each, so multiples of 1/32
    assert all(abs(v * 32 - round(v * 32)) < 1e-9 for v in (acc[0][0], acc[1][0], acc[1][1]))
    assert res["forgetting"]["rte"] == pytest.approx(acc[0][0] - acc[1][0])
    assert res["bwt"] == pytest.approx(acc[1][0] - acc[0][0])
    assert res["objective"] == pytest.approx(acc[1][0] + acc[1][1])
    # MiniLM's 6 layers leave bert10 regions 4 and 8 empty: no LR to report there
    assert res["lrs"] == [None if r in (4, 8) else TINY.lr for r in range(10)] and len(res["task_seconds"]) == 2
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("tasks", "method", "accuracy_matrix", "metrics_matrix", "forgetting", "bwt", "objective",
                "lrs", "seed", "task_seconds"):
        assert saved[key] == res[key]


def test_summarise_three_tasks():
    acc = [[0.8, None, None], [0.7, 0.9, None], [0.6, 0.85, 0.75]]
    s = summarise(["a", "b", "c"], acc)
    assert s["forgetting"] == pytest.approx({"a": 0.2, "b": 0.05})
    assert s["bwt"] == pytest.approx(((0.6 - 0.8) + (0.85 - 0.9)) / 2)
    assert s["objective"] == pytest.approx(0.6 + 0.75)


def test_distribution_sets_the_region_table(runner):
    lrs = [1e-6 * (i + 1) for i in range(10)]
    res = runner.run(Distribution(lrs))
    assert res["lrs"] == [None if r in (4, 8) else lr for r, lr in enumerate(lrs)]
    assert runner.optimizer.region_scales.tolist() == pytest.approx([lr / TINY.lr for lr in lrs])


@pytest.mark.parametrize("method", [lambda: EWC(lam=100.0, fisher_batches=2), lambda: MIGU()], ids=["ewc", "migu"])
def test_ewc_and_migu_runs_complete(runner, method):
    res = runner.run(method())
    assert len(res["accuracy_matrix"]) == 2 and res["method"] in ("ewc", "migu")


def test_resume_after_a_stop_gives_the_same_results(runner, tmp_path):
    full = runner.run(EWC(lam=100.0, fisher_batches=2), output=tmp_path / "full")
    stopped = runner.run(EWC(lam=100.0, fisher_batches=2), output=tmp_path / "part", stop_after=1)
    assert stopped["status"] == "stopped"
    with pytest.raises(ValueError, match="different run"):  # another method must not pick up this checkpoint
        runner.run(Flat(), output=tmp_path / "part", resume=True)
    resumed = runner.run(EWC(lam=100.0, fisher_batches=2), output=tmp_path / "part", resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["metrics_matrix"] == full["metrics_matrix"]


def test_cli_finetune_and_bad_input(minilm_path, glue_dir, tmp_path, capsys):
    base = ["finetune", "--model", str(minilm_path), "--data-dir", str(glue_dir), "--tasks", "rte,mrpc",
            "--max-train-samples", "8",
            "--max-eval-samples", "8", "--max-length", "32", "--no-progress", "--output", str(tmp_path)]
    assert main(base + ["--method", "dist", "--lrs", "paper-rounded"]) == 0
    out = capsys.readouterr().out
    assert "after mrpc" in out and json.loads((tmp_path / "results.json").read_text())["lrs"][9] == pytest.approx(3 * Recipe().lr)
    for extra, message in [(["--tasks", "rte,sst3"], "unknown GLUE task"),
                           (["--method", "dist", "--lrs", "1e-5,2e-5"], "has 2 values"),
                           (["--method", "dist", "--lrs", "1e-5,1e-5,1e-5,1e-5,1e-5,1e-5,1e-5,1e-5,1e-5,0"], "positive"),
                           (["--data-dir", str(tmp_path / "none")], "does not exist"),
                           (["--scheme", "bert11"], "unknown region scheme")]:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("make", [lambda fused: EWC(lam=100.0, fisher_batches=2, fused=fused),
                                  lambda fused: MIGU(fused=fused)], ids=["ewc", "migu"])
def test_fused_methods_match_their_unfused_form(runner, make):
    """The pipeline's EWC and MIGU hand their terms to the optimizer; same results as applying them to grads."""
    fused, plain = runner.run(make(True)), runner.run(make(False))
    assert fused["accuracy_matrix"] == plain["accuracy_matrix"]
    assert not runner.optimizer._ewc and not runner.optimizer._row_masks  # detached after the run


def test_reported_scores_are_reused_not_evaluated_again(runner, monkeypatch):
    """A run with a report (a search trial) scores each task once per set of weights: the report's last
    evaluations are the accuracy matrix's, which equals that of a run without a report."""
    plain = runner.run(Flat())
    calls = []
    evaluate = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda task: calls.append(task) or evaluate(task))
    reported = []
    res = runner.run(Flat(), report=lambda step, value: reported.append(value))
    assert res["accuracy_matrix"] == plain["accuracy_matrix"]
    acc = res["accuracy_matrix"]
    assert reported == pytest.approx([0.5 * acc[0][0], acc[1][0] + acc[1][1]])
    assert calls == ["rte", "rte", "mrpc"]  # after task 1: rte; after task 2: rte and mrpc, once each


def test_bf16_and_length_buckets_recipes_run(minilm_path, glue_dir):
    from dataclasses import replace
    fast = SequentialRunner(minilm_path, "rte,mrpc", replace(TINY, precision="bf16", length_buckets=4),
                            data_dir=glue_dir, progress=False)
    res = fast.run(Flat())
    assert res["recipe"]["precision"] == "bf16" and res["recipe"]["length_buckets"] == 4
    import torch
    with fast._autocast():  # the forward passes run under CPU bf16 autocast
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert fast.model.encoder.embeddings.word_embeddings.weight.new_ones(2, 2).matmul(
            torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        Recipe(precision="fp8")
    with pytest.raises(ValueError, match="length_buckets"):
        Recipe(length_buckets=-1)
