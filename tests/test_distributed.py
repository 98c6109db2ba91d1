"""FusedRegionAdamW under DDP and FSDP2 (DTensor shards), with distributed checkpoints (issue 16).

One real 2-process gloo job on CPU runs every case (this file, run as a script: ``job``) and saves what
it measured; the tests compare those numbers with references: ``torch.optim.AdamW`` with one group per
region under the same wrapper and data (in the job), or one plain process in this test process, with
MIGU's row mask and EWC's penalty gradient applied to the grads before ``clip_grad_norm_`` (the kernel's
order). Each rank takes half of the same global batch, so the data-parallel mean gradient equals the
one-process gradient. The model is a tiny random BERT (Triton runs through its interpreter); its
``token_type_embeddings`` has one row, so rank 1's shard of it is empty.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
import transformers

from lrdist import FusedRegionAdamW
from lrdist.methods import EWC, MIGU
from lrdist.regions import param_groups

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in this one process
REPO = pathlib.Path(__file__).resolve().parents[1]
SCALES = [0.5, 1.5, 0.7, 1.2, 1.0, 0.9, 1.1, 0.8, 1.3, 2.0]
LR, WD, STEPS, BATCH, SEQ, VOCAB = 1e-3, 0.01, 4, 8, 8, 64
CLIP, LAM = 0.5, 0.5
MASKED = ("classifier.weight", "bert.embeddings.token_type_embeddings.weight",
          "bert.encoder.layer.0.intermediate.dense.weight")  # 3 rows (2 + 1), 1 row (1 + 0), 37 rows (19 + 18)
TOL = dict(rtol=0, atol=1e-5)  # the bar, on params of magnitude ~0.02 moved ~4e-3 by 4 steps


# ---- shared by the job and the references -------------------------------------------------------------------

def tiny_bert() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=16, type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=3))


def batches(n=STEPS, seed=1) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen), torch.randint(0, 3, (BATCH,), generator=gen))
            for _ in range(n)]


def reference_groups(model) -> list:
    """torch's AdamW: one group per region (and decay class), each with lr x its region's scale."""
    groups = param_groups(model, "bert10", weight_decay=WD)
    for g in groups:
        g["lr"] = LR * SCALES[g.pop("region")]
    return groups


def terms_inputs(model) -> tuple:
    """Row masks per step, and EWC's Fisher and anchor, as full tensors (the same in every process)."""
    gen = torch.Generator().manual_seed(2)
    params = dict(model.named_parameters())
    masks = [{n: (torch.rand(params[n].shape[0], generator=gen) > 0.4).float() for n in MASKED} for _ in range(STEPS)]
    fisher = {n: torch.rand(p.shape, generator=gen) for n, p in params.items() if n.startswith("bert.encoder")}
    anchor = {n: params[n].detach() + 0.05 * torch.randn(params[n].shape, generator=gen) for n in fisher}
    return masks, fisher, anchor


def full(t) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


# ---- the job: two processes ------------------------------------------------------------------------------------

def job(rank: int, world: int, init: str, out: pathlib.Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_optimizer_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel

    from lrdist.hf import trainer_optimizer

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a hang fails instead of blocking CI
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    data = batches()
    results = {}

    def wrap(model, how):
        if how == "ddp":
            return DistributedDataParallel(model)
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard")) if how == "hsdp" else None
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def train(wrapped, opt, steps, before_step=None):
        norms = []
        for k, (x, y) in steps:
            wrapped(input_ids=x[mine], labels=y[mine]).loss.backward()
            if before_step:
                before_step(k)
            opt.step()
            opt.zero_grad()
            norms.append(opt.last_grad_norm.item() if isinstance(opt, FusedRegionAdamW) and opt.max_grad_norm else None)
        return norms

    def params_of(model):
        return {n: full(p) for n, p in model.named_parameters()}

    def run(how, backend, **kw):
        model = tiny_bert()
        wrapped = wrap(model, how)
        opt = (torch.optim.AdamW(reference_groups(model), lr=LR) if backend == "reference" else
               FusedRegionAdamW(param_groups(model, "bert10", weight_decay=WD), lr=LR, region_scales=SCALES,
                                backend=backend, **kw))
        return model, wrapped, opt

    # DDP and FSDP2, both backends, and torch's AdamW per region under the same wrapper
    for how in ("ddp", "fsdp2"):
        for backend in ("reference", "torch", "triton"):
            model, wrapped, opt = run(how, backend)
            train(wrapped, opt, enumerate(data))
            results[f"{how}-{backend}"] = params_of(model)
            if how == "fsdp2" and backend == "triton":
                state = opt.state[model.bert.embeddings.token_type_embeddings.weight]
                results["empty-shard"] = (state["exp_avg"].to_local().numel(), state["step"].item(),
                                          type(state["exp_avg"]).__name__, tuple(map(repr, state["exp_avg"].placements)))

    # clipping + EWC + row masks under FSDP2 (and clipping under HSDP: the norm must not count replicas twice)
    masks, fisher, anchor = terms_inputs(tiny_bert())
    for how, backend in (("fsdp2", "torch"), ("fsdp2", "triton"), ("hsdp", "triton")):
        model, wrapped, opt = run(how, backend, max_grad_norm=CLIP)
        params = dict(model.named_parameters())
        if how == "fsdp2":
            placed = lambda t, n: distribute_tensor(t, params[n].device_mesh, params[n].placements)  # noqa: E731
            opt.set_ewc({params[n]: placed(f, n) for n, f in fisher.items()},
                        {params[n]: placed(a, n) for n, a in anchor.items()}, LAM)
        step_masks = (lambda k: opt.set_row_masks({params[n]: m for n, m in masks[k].items()})) if how == "fsdp2" else None
        norms = train(wrapped, opt, enumerate(data), step_masks)
        results[f"terms-{how}-{backend}"] = {"params": params_of(model), "norms": norms}

    # MIGU and EWC, the methods, with the fused optimizer under FSDP2
    model, wrapped, opt = run("fsdp2", "torch")
    migu = MIGU(0.7)
    migu.attach(model, model.bert, opt)
    migu.before_task(1)
    train(wrapped, opt, enumerate(data), lambda k: migu.after_backward(model.bert))
    migu.detach()
    results["migu"] = params_of(model)

    model, wrapped, opt = run("fsdp2", "torch")
    ewc = EWC(lam=LAM)
    ewc.attach(model, model.bert, opt)

    def grad_batches(limit=None):
        for x, y in data[:2]:
            opt.zero_grad(set_to_none=True)
            wrapped(input_ids=x[mine], labels=y[mine]).loss.backward()
            yield
        opt.zero_grad(set_to_none=True)
    ewc.after_task(model.bert, grad_batches)
    ewc.before_task(1)
    train(wrapped, opt, list(enumerate(data))[2:], lambda k: ewc.after_backward(model.bert))
    results["ewc"] = {"fisher": {n: full(f) for n, f in ewc.fisher.items()}, "params": params_of(model)}

    # DCP: 2 steps, save, a new model and optimizer (default region scales), load, 2 more steps
    model, wrapped, opt = run("fsdp2", "triton")
    train(wrapped, opt, list(enumerate(data))[:2])
    msd, osd = get_state_dict(wrapped, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=out / "two-ranks")
    for source in ("two-ranks", "one-rank"):
        model = tiny_bert()
        wrapped = wrap(model, "fsdp2")
        opt = FusedRegionAdamW(param_groups(model, "bert10", weight_decay=WD), lr=LR,
                               region_scales=[1.0] * len(SCALES), backend="triton")
        msd, osd = get_state_dict(wrapped, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=out / source)
        set_state_dict(wrapped, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        scales = opt.region_scales.tolist()
        train(wrapped, opt, list(enumerate(data))[2:])
        results[f"resumed-from-{source}"] = {"scales": scales, "params": params_of(model)}

    # the Trainer's route under FSDP: the optimizer built on the sharded model
    factory, kwargs = trainer_optimizer("bert10", lr=LR, region_scales=SCALES, weight_decay=WD)
    built = factory()(model, **kwargs)
    results["trainer-factory"] = [(g["region"], g["weight_decay"], [type(p).__name__ for p in g["params"]])
                                  for g in built.param_groups]

    # bad input: one line, raised before anything changed
    model, wrapped, opt = run("fsdp2", "torch")
    train(wrapped, opt, list(enumerate(data))[:1])
    params = dict(model.named_parameters())
    weight = params["classifier.weight"]
    other_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("other",))
    elsewhere = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), other_mesh, [Shard(0)]))
    plain_model = tiny_bert()
    plain_opt = FusedRegionAdamW(param_groups(plain_model, "bert10", weight_decay=WD), lr=LR, region_scales=SCALES)
    bigger = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
        max_position_embeddings=16, type_vocab_size=1, num_labels=3))
    wrap(bigger, "fsdp2")
    bigger_opt = FusedRegionAdamW(param_groups(bigger, "bert10", weight_decay=WD), lr=LR, region_scales=SCALES)
    for p in bigger.parameters():
        p.grad = torch.zeros_like(p)
    bigger_opt.step()
    bad = {
        "group-mixes-dtensor-and-plain": lambda: opt.add_param_group({"params": [elsewhere, torch.zeros(3)]}),
        "group-mixes-meshes": lambda: opt.add_param_group({"params": [elsewhere, weight.detach().clone()]}),
        "new-optimizer-mixes": lambda: FusedRegionAdamW([weight, plain_model.classifier.weight]),
        "fisher-replicated": lambda: opt.set_ewc({weight: distribute_tensor(torch.ones(3, 32), weight.device_mesh,
                                                                           [Replicate()])},
                                                 {weight: torch.zeros_like(weight)}, 1.0),
        "fisher-plain": lambda: opt.set_ewc({weight: torch.ones(3, 32)}, {weight: torch.zeros_like(weight)}, 1.0),
        "fisher-nan-on-rank-1": lambda: opt.set_ewc(
            {weight: distribute_tensor(torch.tensor([[0.0] * 32, [0.0] * 32, [float("nan")] * 32]),
                                       weight.device_mesh, weight.placements)}, {weight: torch.zeros_like(weight)}, 1.0),
        "state-of-other-shapes": lambda: set_optimizer_state_dict(wrapped, opt, bigger_opt.state_dict()),
        "sharded-state-into-plain": lambda: plain_opt.load_state_dict(opt.state_dict()),
        "row-mask-as-dtensor": lambda: opt.set_row_masks({weight: distribute_tensor(torch.ones(3), weight.device_mesh,
                                                                                    [Shard(0)])}),
    }
    def snapshot():
        tensors = [full(p) for p in model.parameters()] + [full(v) for s in opt.state.values() for v in s.values()]
        return tensors, [dict(g, params=len(g["params"])) for g in opt.param_groups], set(opt._ewc), len(plain_opt.state)

    for name, call in bad.items():
        before = snapshot()
        try:
            call()
            message = None
        except (ValueError, TypeError, RuntimeError) as exc:
            message = f"{type(exc).__name__}: {exc}"
        after = snapshot()
        same = len(before[0]) == len(after[0]) and all(map(torch.equal, before[0], after[0])) and before[1:] == after[1:]
        results[f"bad-{name}"] = (message, same)

    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ---- the tests ------------------------------------------------------------------------------------------------

def one_process(opt_kind="reference", steps=None, opt=None, model=None, terms=None):
    """Plain torch in this process on the whole batch; returns (model, optimizer, grad norms)."""
    model = model or tiny_bert()
    if opt is None:
        opt = (torch.optim.AdamW(reference_groups(model), lr=LR) if opt_kind == "reference" else
               FusedRegionAdamW(param_groups(model, "bert10", weight_decay=WD), lr=LR, region_scales=SCALES))
    params, norms = dict(model.named_parameters()), []
    for k, (x, y) in steps if steps is not None else enumerate(batches()):
        model(input_ids=x, labels=y).loss.backward()
        if terms is not None:  # mask, EWC, clip, as the kernel orders them
            masks, fisher, anchor = terms
            with torch.no_grad():
                for n, keep in (masks[k] if masks else {}).items():
                    params[n].grad.mul_(keep.view(-1, 1))
                for n, f in fisher.items():
                    params[n].grad.add_(2 * LAM * f * (params[n] - anchor[n]))
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad()
    return model, opt, norms


def assert_params_close(got: dict, expected: dict, **tol) -> None:
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], **(tol or TOL), msg=lambda m: f"{n}: {m}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs the job once: a one-rank checkpoint first (to load on two ranks), then two processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = tmp_path_factory.mktemp("distributed")
    model, opt, _ = one_process("ours", steps=list(enumerate(batches()))[:2])
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=out / "one-rank")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    init = (out / "store").as_uri()
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", "2", "--init", init,
                               "--out", str(out)], env=env, stdout=open(out / f"log{r}", "w"), stderr=subprocess.STDOUT)
             for r in range(2)]
    try:
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "".join((out / f"log{r}").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("how", ["ddp", "fsdp2"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_torch_adamw_per_region_under_the_same_wrapper(results, how, backend):
    _, ranks = results
    for res in ranks:  # every rank ends with the same (gathered) params
        assert_params_close(res[f"{how}-{backend}"], res[f"{how}-reference"])
        assert_params_close(res[f"{how}-{backend}"], ranks[0][f"{how}-{backend}"], rtol=0, atol=0)
    moved = max((ranks[0][f"{how}-reference"][n] - p).abs().max() for n, p in tiny_bert().named_parameters())
    assert moved > 1e-3  # the steps did something


def test_state_is_placed_like_the_param_and_an_empty_shard_steps_nothing(results):
    _, ranks = results
    local_sizes, steps, kinds, placements = zip(*(res["empty-shard"] for res in ranks))
    assert local_sizes == (32, 0)            # rank 1 holds no row of the one-row embedding
    assert steps == (4.0, 4.0)               # its step count still moves, as torch's does
    assert kinds == ("DTensor", "DTensor") and placements == (("Shard(dim=0)",), ("Shard(dim=0)",))


@pytest.mark.parametrize("case", ["fsdp2-torch", "fsdp2-triton"])
def test_clipping_ewc_and_row_masks_under_fsdp2_match_one_process(results, case):
    _, ranks = results
    model, _, norms = one_process(terms=terms_inputs(tiny_bert()))
    for res in ranks:
        got = res[f"terms-{case}"]
        assert_params_close(got["params"], dict((n, full(p)) for n, p in model.named_parameters()))
        assert max(norms) > CLIP  # clipping acted
        torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(norms), rtol=1e-5, atol=0)


def test_hsdp_norm_counts_replicated_dims_once(results):
    """Mesh (replicate 2, shard 1): each rank holds a whole copy; summing over the replicas would report
    sqrt(2) times the norm and clip twice as hard."""
    _, ranks = results
    model, _, norms = one_process(terms=(None, {}, {}))
    for res in ranks:
        got = res["terms-hsdp-triton"]
        torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(norms), rtol=1e-5, atol=0)
        assert_params_close(got["params"], {n: full(p) for n, p in model.named_parameters()})


def test_migu_masks_the_rows_one_process_masks_on_the_whole_batch(results):
    _, ranks = results
    model = tiny_bert()
    migu = MIGU(0.7, fused=False)
    migu.attach(model, model.bert)
    migu.before_task(1)
    opt = torch.optim.AdamW(reference_groups(model), lr=LR)
    for x, y in batches():
        model(input_ids=x, labels=y).loss.backward()
        migu.after_backward(model.bert)
        opt.step()
        opt.zero_grad()
    for res in ranks:
        assert_params_close(res["migu"], {n: full(p) for n, p in model.named_parameters()})


def test_ewc_fisher_and_fused_penalty_under_fsdp2_match_one_process(results):
    _, ranks = results
    model = tiny_bert()
    ewc = EWC(lam=LAM, fused=False)
    ewc.attach(model, model.bert)
    data = batches()

    def grad_batches(limit=None):
        for x, y in data[:2]:
            model.zero_grad(set_to_none=True)
            model(input_ids=x, labels=y).loss.backward()
            yield
        model.zero_grad(set_to_none=True)
    ewc.after_task(model.bert, grad_batches)
    opt = torch.optim.AdamW(reference_groups(model), lr=LR)
    for x, y in data[2:]:
        model(input_ids=x, labels=y).loss.backward()
        ewc.after_backward(model.bert)
        opt.step()
        opt.zero_grad()
    for res in ranks:
        got = res["ewc"]
        assert got["fisher"].keys() == ewc.fisher.keys()
        for n, f in ewc.fisher.items():  # normalised to mean 1 over the whole encoder, on every rank
            torch.testing.assert_close(got["fisher"][n], f, rtol=1e-4, atol=1e-5)
        assert_params_close(got["params"], {n: full(p) for n, p in model.named_parameters()})


def test_dcp_resume_with_region_scales_equals_the_uninterrupted_run(results):
    _, ranks = results
    for res in ranks:
        resumed = res["resumed-from-two-ranks"]
        assert resumed["scales"] == SCALES  # not the defaults the new optimizer was built with
        assert_params_close(resumed["params"], res["fsdp2-triton"], rtol=0, atol=1e-7)


def test_a_two_rank_checkpoint_loads_on_one_rank(results):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out, ranks = results
    model = tiny_bert()
    opt = FusedRegionAdamW(param_groups(model, "bert10", weight_decay=WD), lr=LR, region_scales=[1.0] * len(SCALES))
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=out / "two-ranks")
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    assert opt.region_scales.tolist() == SCALES
    one_process(steps=list(enumerate(batches()))[2:], opt=opt, model=model)
    assert_params_close({n: full(p) for n, p in model.named_parameters()}, ranks[0]["fsdp2-triton"])


def test_a_one_rank_checkpoint_loads_on_two_ranks(results):
    _, ranks = results
    model, _, _ = one_process("ours")  # the uninterrupted one-process run
    for res in ranks:
        resumed = res["resumed-from-one-rank"]
        assert resumed["scales"] == SCALES
        assert_params_close(resumed["params"], {n: full(p) for n, p in model.named_parameters()})


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
def test_dcp_state_dict_helpers_keep_the_region_scales(flatten):
    """get/set_optimizer_state_dict keep only ``state`` and ``param_groups``: the table rides in the groups
    (the flattened form rebuilds groups from the live groups' keys, so the live groups carry it too)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model, opt, _ = one_process("ours", steps=list(enumerate(batches()))[:1])
    osd = get_optimizer_state_dict(model, opt, options=options)
    fresh = tiny_bert()
    fresh_opt = FusedRegionAdamW(param_groups(fresh, "bert10", weight_decay=WD), lr=LR, region_scales=[1.0] * len(SCALES))
    set_optimizer_state_dict(fresh, fresh_opt, osd, options=options)
    assert fresh_opt.region_scales.tolist() == SCALES
    assert all(g["region_scales"] == tuple(SCALES) for g in fresh_opt.param_groups)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert all(torch.equal(opt.state[p][k], fresh_opt.state[q][k]) for k in opt.state[p])


def test_the_trainer_factory_builds_region_groups_on_the_sharded_model(results):
    from lrdist.hf import NO_DECAY
    _, ranks = results
    expected = [(g["region"], g["weight_decay"], ["DTensor"] * len(g["params"]))
                for g in param_groups(tiny_bert(), "bert10", weight_decay=WD, no_decay=NO_DECAY)]
    assert ranks[0]["trainer-factory"] == expected


BAD = {
    "group-mixes-dtensor-and-plain": "mixes DTensor and plain tensor parameters",
    "group-mixes-meshes": "mixes DTensors on different device meshes",
    "new-optimizer-mixes": "mixes DTensor and plain tensor parameters",
    "fisher-replicated": "Fisher of a parameter that is a DTensor placed",
    "fisher-plain": "Fisher of a parameter that is a DTensor placed .* is a plain tensor",
    "fisher-nan-on-rank-1": "holds NaN or inf",
    "state-of-other-shapes": "belongs to another model",
    "sharded-state-into-plain": "load sharded state with",
    "row-mask-as-dtensor": "plain tensor over all the weight's rows",
}


@pytest.mark.parametrize("name", BAD)
def test_bad_distributed_input_raises_one_line_on_every_rank_and_changes_nothing(results, name):
    _, ranks = results
    for res in ranks:
        message, unchanged = res[f"bad-{name}"]
        assert message is not None and re.search(BAD[name], message), message
        assert "\n" not in message and len(message) < 300
        assert unchanged


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--rank", "--world"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--init", required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    job(args.rank, args.world, args.init, args.out)


if __name__ == "__main__":
    main()
