"""The experiment measures something: noise shown, held-out scoring, empty regions, EWC and LoRA that act."""
import math

import pytest
import torch

from lrdist import stats
from lrdist.cli import main
from lrdist.combine import combine
from lrdist.continual import DEFAULT_TASKS, RECIPES, Recipe, SequentialRunner
from lrdist.data import HELDOUT, encode, load_split
from lrdist.methods import EWC, Flat, LoRA, fill_missing
from lrdist.search import SearchSpace

TINY = Recipe(epochs=1, batch_size=8, max_length=32, max_train_samples=32, max_eval_samples=32, pooling="mean")


def test_paired_difference_against_a_hand_computed_example():
    a, b = [0.80, 0.75, 0.90, 0.85], [0.70, 0.72, 0.80, 0.83]
    # by hand: differences .10 .03 .10 .02, mean .0625, sample sd .043493, se .021747, t(3, 97.5%) = 3.1824
    d = stats.paired_difference(a, b)
    assert d.mean == pytest.approx(0.0625)
    assert d.low == pytest.approx(0.0625 - 3.1824 * 0.021747, abs=1e-4)
    assert d.high == pytest.approx(0.0625 + 3.1824 * 0.021747, abs=1e-4)
    assert not d.excludes_zero and d.n == 4
    # a consistent difference excludes zero
    assert stats.paired_difference([0.9, 0.91, 0.92], [0.8, 0.8, 0.81]).excludes_zero
    assert stats.binomial_se(0.8, 100) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_difference([1.0], [1.0, 2.0])


def test_heldout_slice_is_disjoint_from_training_rows_and_validation(minilm_path, glue_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_path)
    for task in ("rte", "sst2"):
        n_train = len(load_split(task, "train", glue_dir))
        train = encode(tok, task, "train", 512, None if task == "rte" else 2000, glue_dir, heldout_samples=200)
        held = encode(tok, task, HELDOUT, 512, None, glue_dir, heldout_samples=200)
        assert len(held) == min(200, n_train // 5) and len(set(held.idx)) == len(held)
        assert not set(held.idx) & set(train.idx), f"{task}: a held-out row is also a training row"
        if task == "rte":  # all of train but the held-out slice
            assert sorted(train.idx + held.idx) == sorted(load_split(task, "train", glue_dir)["idx"])
        # never a validation row: compare the texts themselves
        spec_cols = ("sentence1", "sentence2") if task == "rte" else ("sentence",)
        rows = lambda split: {tuple(r[c] for c in spec_cols) for r in load_split(task, split, glue_dir)}  # noqa: E731
        train_rows = load_split(task, "train", glue_dir)
        held_texts = {tuple(train_rows[i][c] for c in spec_cols) for i in held.idx}
        assert not held_texts & rows("validation"), f"{task}: held-out rows found in the validation split"


def test_search_space_leaves_out_empty_regions(minilm_path):
    space = SearchSpace.for_model(str(minilm_path), "bert10")
    assert space.empty == (4, 8)  # 6 layers over bert10's 8 layer groups
    assert space.names() == [f"lr_{r}" for r in (0, 1, 2, 3, 5, 6, 7, 9)]
    import optuna
    study = optuna.create_study()
    lrs = space.suggest(study.ask())
    assert lrs[4] is None and lrs[8] is None and all(v is not None for i, v in enumerate(lrs) if i not in (4, 8))


def test_combine_and_fill_handle_regions_missing_in_some_models():
    a = [1e-5, 2e-5, None, 4e-5]
    b = [4e-5, None, None, 1e-5]
    got = combine([a, b])
    assert got[2] is None and got[0] == pytest.approx(2e-5) and got[1] == pytest.approx(2e-5)
    filled = fill_missing([1e-5, None, None, 8e-5])  # log-linear between neighbours
    assert filled == pytest.approx([1e-5, 2e-5, 4e-5, 8e-5])
    assert fill_missing([None, 3e-5, None]) == pytest.approx([3e-5, 3e-5, 3e-5])


@pytest.fixture(scope="module")
def runner(minilm_path, glue_dir):
    return SequentialRunner(minilm_path, "rte,mrpc", TINY, data_dir=glue_dir, progress=False)


def _encoder_weights(runner):
    return torch.cat([p.detach().flatten() for p in runner.model.encoder.parameters()])


def test_ewc_at_its_default_changes_training(runner):
    start = torch.cat([v.flatten() for k, v in runner.initial_state.items() if k.startswith("encoder.")])
    flat = runner.run(Flat())
    w_flat = _encoder_weights(runner)
    ewc = runner.run(EWC(fisher_batches=2))
    w_ewc = _encoder_weights(runner)
    moved = (w_flat - start).norm()
    assert (w_ewc - w_flat).norm() > 0.05 * moved, "EWC at its default strength left training unchanged"
    ratio = ewc["method_stats"]["penalty_to_loss_grad"]["1"]
    assert ratio > 0.01  # the penalty gradient is not orders of magnitude below the loss gradient
    assert flat["method_stats"] == {}


def test_lora_trains_adapters_and_leaves_the_pretrained_encoder_untouched(runner):
    res = runner.run(LoRA(rank=4, lr=1e-3))
    assert type(runner.model.encoder).__name__ == "BertModel"  # unwrapped after the run
    assert all(p.requires_grad for p in runner.model.parameters())
    for name, value in runner.model.encoder.state_dict().items():  # frozen: still the pretrained weights
        torch.testing.assert_close(value, runner.initial_state["encoder." + name], rtol=0, atol=0)
    heads_moved = any(not torch.equal(p.detach(), runner.initial_state[f"heads.{n}"])
                      for n, p in runner.model.heads.named_parameters())
    assert heads_moved and res["method"] == "lora"
    # an ordinary run afterwards matches one on a fresh runner state: the optimizer was restored
    assert runner.optimizer.param_groups[0]["params"][0] is next(runner.model.parameters())


@pytest.fixture(scope="module")
def flat_run(runner):
    return runner.run(Flat())


def test_results_carry_standard_errors(flat_run):
    res = flat_run
    n = res["eval_samples"]["rte"]
    acc, se = res["accuracy_matrix"], res["accuracy_se_matrix"]
    assert se[0][0] == pytest.approx(math.sqrt(acc[0][0] * (1 - acc[0][0]) / n))
    assert res["objective_se"] == pytest.approx(math.hypot(se[1][0], se[1][1]))
    assert res["eval_on"] == "validation"


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--pooling", "max"], "invalid choice"),
    (["finetune", "--method", "lora", "--lora-rank", "0"], "LoRA rank must be a positive integer"),
    (["evaluate", "--tune-baselines", "2", "--methods", "flat"], "--tune-baselines needs the pairs"),
    (["evaluate", "--methods", "flat,combined"], "but no --combined file"),
])
def test_bad_experiment_input_is_one_line(argv, message, capsys, tmp_path):
    try:
        code = main(argv + ["--output", str(tmp_path / "out")])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_default_flat_run_learns_every_task_and_forgets_the_first(minilm_path, glue_dir):
    """Issue 9's bar on the embedded defaults: each task 10 points above its majority class right after its
    own training, and the first task down 5 points after the second (means of 3 seeds)."""
    runner = SequentialRunner(minilm_path, DEFAULT_TASKS, RECIPES["fast"], data_dir=glue_dir, progress=False)
    runs = [runner.run(Flat(), seed=s)["accuracy_matrix"] for s in (0, 1, 2)]
    for i, task in enumerate(runner.tasks):
        labels = runner.eval[task].labels
        majority = labels.bincount().max().item() / len(labels)
        assert sum(r[i][i] for r in runs) / 3 >= majority + 0.10, task
    assert sum(r[0][0] - r[1][0] for r in runs) / 3 >= 0.05


def test_tune_baselines_gives_each_knob_its_trials_and_evaluate_uses_the_best(minilm_path, glue_dir, tmp_path):
    import json

    import optuna

    from lrdist.evaluate import evaluate
    from lrdist.tune import tune_baselines
    best = tune_baselines(str(minilm_path), [["rte", "mrpc"]], TINY, 2, str(tmp_path), methods=["llrd"],
                          data_dir=str(glue_dir), progress=False)
    study = optuna.load_study(study_name="tune-llrd", storage=f"sqlite:///{tmp_path / 'tune.db'}")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2 and trials[0].params == {"llrd_decay": 0.8}  # the default comes first
    top = max(trials, key=lambda t: t.value)
    assert best == {"llrd": top.params}
    # each trial's value is the search objective on the held-out slice: rerun the best by hand to check
    runner = SequentialRunner(minilm_path, "rte,mrpc", replace_eval(TINY, "heldout"), data_dir=glue_dir, progress=False)
    from lrdist.methods import LLRD
    assert runner.run(LLRD(top.params["llrd_decay"]))["objective"] == pytest.approx(top.value)
    assert json.loads((tmp_path / "tuned.json").read_text())["best"] == best
    res = evaluate(str(minilm_path), [["rte", "mrpc"]], TINY, [0], str(tmp_path / "eval"), methods=["flat", "llrd"],
                   data_dir=str(glue_dir), progress=False, tuned=best)
    assert [r["method_config"]["llrd_decay"] for r in res["runs"] if r["method"] == "llrd"] == [top.params["llrd_decay"]]



def test_lora_tunes_its_rank_and_its_adapter_lr_together(minilm_path, glue_dir, tmp_path):
    """LoRA's adapters start at zero and need an LR of their own: both knobs are tuned, defaults first,
    and evaluate builds LoRA with the best pair."""
    import optuna

    from lrdist.evaluate import evaluate
    from lrdist.tune import tune_baselines
    best = tune_baselines(str(minilm_path), [["rte", "mrpc"]], TINY, 2, str(tmp_path), methods=["lora"],
                          data_dir=str(glue_dir), progress=False)
    study = optuna.load_study(study_name="tune-lora", storage=f"sqlite:///{tmp_path / 'tune.db'}")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2 and trials[0].params == {"lora_rank": 8, "lora_lr": 5e-4}
    assert set(trials[1].params) == {"lora_rank", "lora_lr"} and trials[1].params != trials[0].params
    assert best == {"lora": max(trials, key=lambda t: t.value).params}
    res = evaluate(str(minilm_path), [["rte", "mrpc"]], TINY, [0], str(tmp_path / "eval"), methods=["lora"],
                   data_dir=str(glue_dir), progress=False, tuned=best)
    config = res["runs"][0]["method_config"]
    assert (config["lora_rank"], config["lora_lr"]) == (best["lora"]["lora_rank"], best["lora"]["lora_lr"])

def replace_eval(recipe, eval_on):
    from dataclasses import replace
    return replace(recipe, eval_on=eval_on)


def test_not_learned_is_two_standard_errors_above_the_majority_rate():
    """The issue's MRPC: 0.689-0.706 after its own training on 408 rows against a majority rate of 0.684."""
    se = math.sqrt(0.684 * 0.316 / 408)  # 0.0230, at the majority rate: the bar is 0.684 + 0.046
    assert not stats.learned(0.706, 0.684, 408) and 0.706 - 0.684 < 2 * se
    assert stats.learned(0.80, 0.684, 408)
    assert not stats.learned(0.30, 0.684, 408)  # below the majority rate: a flip to the minority class
    assert not stats.learned(1.0, 1.0, 16)  # a single-class split predicted perfectly learned nothing
    assert not stats.learned(1.0, 0.8125, 16)  # 3 rows above 13 of 16: within 2 se (0.098) of the majority
    assert stats.learned(1.0, 0.5, 16)
    assert stats.majority_rate([1, 0, 1, 1]) == 0.75


def test_an_unlearned_task_is_flagged_in_the_finetune_table(runner, flat_run):
    """A real tiny run (32 rows): the flag follows the accuracy against the majority rate of the rows scored,
    both computed here from the labels the runner scored."""
    from collections import Counter

    from lrdist.continual import format_results
    res = flat_run
    expected = []
    for i, task in enumerate(runner.tasks):
        labels = runner.eval[task].labels.tolist()
        majority = Counter(labels).most_common(1)[0][1] / len(labels)
        assert res["majority_rate"][task] == pytest.approx(majority)
        acc = res["accuracy_matrix"][i][i]
        if acc - majority <= 2 * math.sqrt(max(majority * (1 - majority), 1 / len(labels)) / len(labels)):
            expected.append(task)
    assert expected, "32 rows and 4 steps were expected to learn nothing"
    assert stats.unlearned(res) == expected
    text = format_results(res)
    forgetting = next(line for line in text.splitlines() if line.startswith("forgetting"))
    assert ("rte +" in forgetting or "rte -" in forgetting) and ("(not learned)" in forgetting) == ("rte" in expected)
    note = text.splitlines()[-2]
    assert all(f"{t} {res['accuracy_matrix'][i][i]:.3f} vs majority" in note
               for i, t in enumerate(runner.tasks) if t in expected)
    assert "its forgetting means nothing" in note


def test_the_search_warns_when_its_flat_baseline_learns_nothing(cli_search, glue_dir):
    """The session's one-trial search (16 rows per task) is its flat baseline; its table says which tasks
    it did not learn, by the majority rate of the held-out rows it scored, computed here from their labels."""
    from collections import Counter

    from lrdist.combine import open_studies
    from lrdist.data import HELDOUT, select_rows
    from lrdist.search import format_trials
    study = open_studies(str(cli_search[0]))[0]
    flat = study.trials[0]
    res = flat.user_attrs["results"]
    expected = []
    for i, task in enumerate(res["tasks"]):
        labels = list(select_rows(task, HELDOUT, 16, glue_dir, heldout_samples=500)["label"])
        majority = Counter(labels).most_common(1)[0][1] / len(labels)
        acc = res["accuracy_matrix"][i][i]
        if acc - majority <= 2 * math.sqrt(max(majority * (1 - majority), 1 / len(labels)) / len(labels)):
            expected.append(task)
    assert expected
    text = format_trials(study)
    assert f"(not learned: {', '.join(expected)})" in text.splitlines()[2]
    warning = text.splitlines()[-1]
    assert warning.startswith("warning: the flat baseline did not learn ") and "its forgetting means nothing" in warning
    assert all(t in warning for t in expected)
    assert "n = rte 16, mrpc 16 rows" in text.splitlines()[0]
