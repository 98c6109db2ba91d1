"""Batched trials: K replicas trained together equal K separate runs; a batched search; worker placement."""
import pytest
import torch
from conftest import TEST_DEVICE
from optuna.trial import TrialState

from lrdist.batched import BatchedRunner
from lrdist.continual import Recipe, SequentialRunner
from lrdist.methods import EWC, Distribution
from lrdist.placement import parse_devices, place_workers
from lrdist.search import SearchConfig, search

TINY = Recipe(epochs=1, batch_size=8, max_length=32, max_train_samples=16, max_eval_samples=16)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_path):
    """A real BertModel, small enough for the Triton interpreter, with MiniLM's tokenizer and no dropout
    (so that K replicas and K runs see the same computation)."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    tok = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                 intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    folder = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["torch", pytest.param("triton", marks=pytest.mark.slow)])  # the interpreter: minutes
def runner(request, tiny_bert, glue_dir):
    run = SequentialRunner(tiny_bert, "rte,mrpc", TINY, data_dir=glue_dir, device=TEST_DEVICE, backend=request.param,
                           progress=False)
    run.optimizer.block_size = 16384  # fewer programs for the Triton interpreter; the replicas' optimizer copies it
    return run


def random_distributions(k, seed):
    g = torch.Generator().manual_seed(seed)  # log-uniform LRs in [1e-5, 1e-2]: every replica learns visibly
    return [Distribution((10 ** (torch.rand(10, generator=g, dtype=torch.float64) * 3 - 5)).tolist()) for _ in range(k)]


def assert_same_weights(runner, batched_weights, lrs, steps):
    """fp32: replica and run differ only in the last bits of batched matmuls, which Adam turns into
    visible moves on elements whose gradient is ~0. So each tensor's update must match in norm to 1e-3,
    and attention key biases (true gradient exactly 0: softmax ignores a shift, so Adam moves them on
    round-off alone) must stay within Adam's per-step bound of the region's LR."""
    initial = runner.initial_state
    for name, p in runner.model.named_parameters():
        ours, ref = batched_weights[name], p.detach()
        if "key.bias" in name:
            lr = lrs[runner.regions.region_of[name]]
            assert (ours - ref).abs().max() <= 4 * steps * lr, name
            continue
        update = ref - initial[name]
        assert (ours - ref).norm() <= 1e-3 * update.norm() + 1e-7, (name, (ours - ref).norm(), update.norm())


def test_k_replicas_equal_k_runs_with_pruning(runner):
    """K=3 with replica 1 pruned at its first report: replicas 0 and 2 equal runs 0 and 2 (results, reports,
    weights); replica 1 stopped where a run stopped by the same report stops."""
    dists = random_distributions(3, seed=1)
    batched_reports = []

    def prune_one(k, step, value):
        batched_reports.append((k, step, value))
        return k == 1

    batched = BatchedRunner(runner)
    results = batched.run(dists, report=prune_one)
    steps = TINY.epochs * 2 * 2  # 16 rows in batches of 8, two tasks
    empty = runner.regions.empty  # a region without parameters reports no LR, as in runner.run
    assert results[1] == {"status": "pruned", "step": 0,
                          "lrs": [None if r in empty else v for r, v in enumerate(dists[1].values)]}
    assert [step for k, step, _ in batched_reports if k == 1] == [0]  # no evaluation after pruning

    for k in (0, 2):
        reports = []
        ref = runner.run(dists[k], report=lambda step, value: reports.append((step, value)))
        ours = results[k]
        for key in ref:
            if key not in ("task_seconds", "total_seconds"):
                assert ours[key] == ref[key], key  # accuracy and metric matrices, forgetting, objective ...
        assert [(s, v) for kk, s, v in batched_reports if kk == k] == reports
        assert_same_weights(runner, batched.weights[k], ref["lrs"], steps)

    class Stop(Exception):
        pass

    def stop(step, value):
        assert (1, step, value) in batched_reports
        raise Stop

    with pytest.raises(Stop):
        runner.run(dists[1], report=stop)  # the run's model now holds the weights at its first report
    assert_same_weights(runner, batched.weights[1], dists[1].values, steps // 2)


def test_replicas_stay_independent_and_bad_input(runner):
    """Two replicas of one distribution end alike, and unlike a third; bad input fails before training."""
    if runner.optimizer.backend == "triton":
        pytest.skip("nothing backend-specific here; the Triton interpreter is slow")
    d = random_distributions(2, seed=2)
    batched = BatchedRunner(runner)
    results = batched.run([d[0], d[0], d[1]])
    assert results[0]["accuracy_matrix"] == results[1]["accuracy_matrix"]
    same, other = batched.weights[1], batched.weights[2]
    for name, w in batched.weights[0].items():
        torch.testing.assert_close(w, same[name], rtol=1e-6, atol=1e-7)
    assert sum(not torch.allclose(w, other[name]) for name, w in batched.weights[0].items()) > 20
    with pytest.raises(ValueError, match="non-empty list"):
        BatchedRunner(runner).run([])
    with pytest.raises(ValueError, match="has 2 values but the region scheme has 10"):
        BatchedRunner(runner).run([d[0], Distribution([1e-5, 1e-5])])
    with pytest.raises(ValueError, match="only LR-only methods"):
        BatchedRunner(runner).run([d[0], EWC(lam=1.0)])
    with pytest.raises(TypeError, match="expected a Method"):
        BatchedRunner(runner).run([[1e-5] * 10])


def test_bf16_replicas_match_runs_at_bf16_rounding(tiny_bert, glue_dir):
    """Inside vmap autocast runs a linear layer as a bf16 matmul plus an fp32 bias add (its output fp32;
    checked here so that a torch which changes it shows up): bf16 replicas then differ from bf16 runs by
    about what bf16 rounding moves, far less than what the training moves."""
    x, w, b = torch.randn(3, 8), torch.randn(2, 4, 8), torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(x, w[0], b[0]).dtype == torch.bfloat16
        assert torch.func.vmap(lambda v, c: torch.nn.functional.linear(x, v, c))(w, b).dtype == torch.float32
    from dataclasses import replace
    bf16 = SequentialRunner(tiny_bert, "rte,mrpc", replace(TINY, precision="bf16"), data_dir=glue_dir, progress=False)
    fp32 = SequentialRunner(tiny_bert, "rte,mrpc", replace(TINY, precision="fp32"), data_dir=glue_dir, progress=False)
    dists = random_distributions(2, seed=3)
    batched = BatchedRunner(bf16)
    results = batched.run(dists)

    def distance(a, b):  # over every tensor but the attention key biases (true gradient 0: see assert_same_weights)
        return sum((a[n] - b[n]).norm() ** 2 for n in a if "key.bias" not in n).item() ** 0.5
    for k in range(2):
        fp32.run(dists[k])
        assert bf16.run(dists[k])["lrs"] == results[k]["lrs"]
        run = {n: p.detach() for n, p in bf16.model.named_parameters()}
        exact = {n: p.detach() for n, p in fp32.model.named_parameters()}
        rounding = distance(run, exact)  # what bf16 itself moves the weights by
        assert 0 < distance(batched.weights[k], run) < 0.75 * rounding  # nearer the bf16 run than fp32 is ...
        assert distance(batched.weights[k], exact) > 0.5 * rounding      # ... and not an fp32 run itself
        assert rounding < 0.05 * distance(run, bf16.initial_state)


def test_batched_search_ends_with_exactly_n_distinct_trials(tmp_path, minilm_path, glue_dir):
    """5 trials asked 2 at a time (the last batch holds 1), with pruning: 5 finished, flat baseline first."""
    recipe = Recipe(epochs=2, batch_size=8, max_length=32, max_train_samples=8, max_eval_samples=8)
    cfg = SearchConfig(model=str(minilm_path), tasks=["rte", "mrpc"], recipe=recipe, data_dir=str(glue_dir),
                       output=str(tmp_path), progress=False, trials=5, batch_trials=2, pruner="median", seed=3)
    study = search(cfg)
    assert len(study.trials) == 5
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 5
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 5  # distinct distributions
    first = study.trials[0]
    assert first.user_attrs.get("baseline") and set(first.params.values()) == {recipe.lr}  # flat at the recipe LR
    for t in finished:
        assert t.intermediate_values and 0 in t.intermediate_values  # every trial reported per epoch
        if t.state == TrialState.COMPLETE:
            res = t.user_attrs["results"]
            # regions this 6-layer model lacks are not searched and report no LR
            assert res["lrs"] == [t.params.get(f"lr_{r}") for r in range(10)] and None in res["lrs"]
            assert t.value == pytest.approx(res["accuracy_matrix"][1][0] + res["accuracy_matrix"][1][1])
            assert max(t.intermediate_values) == 3  # the last report of 2 epochs x 2 tasks
        else:
            assert 3 not in t.intermediate_values
    # again: nothing left to do, nothing added
    assert len(search(cfg).trials) == 5
    with pytest.raises(ValueError, match="batch-trials must be at least 1"):
        SearchConfig(model=str(minilm_path), tasks=["rte", "mrpc"], recipe=recipe, data_dir=None,
                     output=str(tmp_path), batch_trials=0)


def test_placement_round_robin_over_fake_device_lists():
    two = ["cuda:0", "cuda:1"]
    assert place_workers(4, two, two) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert place_workers(1, two, two) == ["cuda:0"]
    assert place_workers(3, ["cuda:1"], two) == ["cuda:1"] * 3  # several workers share one GPU
    assert place_workers(2, ["cpu"], ["cpu"]) == ["cpu", "cpu"]
    assert parse_devices("0, 2") == ["cuda:0", "cuda:2"] and parse_devices("cpu") == ["cpu"]
    assert parse_devices("cuda") == ["cuda:0"] and parse_devices(None) is None
    with pytest.raises(ValueError, match="cuda:2 not visible"):
        place_workers(2, ["cuda:0", "cuda:2"], two)
    with pytest.raises(ValueError, match="not a device"):
        parse_devices("gpu0")
    with pytest.raises(ValueError, match="is empty"):
        place_workers(1, [], two)
