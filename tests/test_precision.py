"""lrdist.precision: bf16 GEMMs on a CPU run as fp32 GEMMs of the bf16 values, rounded once to bf16. Checked
against an fp64 product of the same bf16 values, under autocast forward and backward, and in the runner."""
import contextlib
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from lrdist import identity, precision
from lrdist.continual import Recipe, SequentialRunner

TINY = Recipe(epochs=1, batch_size=8, max_length=32, max_train_samples=16, max_eval_samples=16, precision="bf16")


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at |x| (8 significant bits)."""
    exp = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -126)))
    return torch.exp2(exp - 7)


def rand(*shape, gen):
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


class Counting(precision.Fp32Gemms):
    """Fp32Gemms that counts the bf16 GEMMs it takes over."""
    calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in precision._GEMMS and all(a.dtype == torch.bfloat16 for a in args if isinstance(a, torch.Tensor)):
            Counting.calls += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


CASES = {
    "mm": lambda g: ((rand(37, 53, gen=g), rand(53, 19, gen=g)), {},
                     lambda a, b: a @ b),
    "addmm": lambda g: ((rand(19, gen=g), rand(37, 53, gen=g), rand(53, 19, gen=g)), {"beta": 0.5, "alpha": 2.0},
                        lambda c, a, b: 0.5 * c + 2.0 * (a @ b)),
    "bmm": lambda g: ((rand(3, 17, 29, gen=g), rand(3, 29, 11, gen=g)), {},
                      lambda a, b: a @ b),
    "baddbmm": lambda g: ((rand(3, 17, 11, gen=g), rand(3, 17, 29, gen=g), rand(3, 29, 11, gen=g)), {"alpha": 0.25},
                          lambda c, a, b: c + 0.25 * (a @ b)),
}


@pytest.mark.parametrize("op", list(CASES))
def test_each_bf16_gemm_is_the_exact_product_rounded_once(op):
    gen = torch.Generator().manual_seed(0)
    args, kwargs, exact = CASES[op](gen)
    Counting.calls = 0
    with Counting():
        got = getattr(torch, op)(*args, **kwargs)
    assert Counting.calls == 1                         # taken over, not left to oneDNN
    want = exact(*(a.double() for a in args))          # the same bf16 values, multiplied in fp64
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    off = (got.double() - want).abs()
    assert bool((off <= bf16_ulp(want) / 2 + 1e-6 * want.abs()).all())  # nearest bf16, up to fp32 sum error
    assert (got.double() == want.to(torch.bfloat16).double()).float().mean() > 0.99


def test_other_ops_and_dtypes_are_left_as_they_are():
    gen = torch.Generator().manual_seed(1)
    a32, b32 = torch.randn(8, 5, generator=gen), torch.randn(5, 3, generator=gen)
    a16, b16 = a32.half(), b32.half()
    x = rand(4, 4, gen=gen)
    with precision.Fp32Gemms():
        got = (a32 @ b32, a16 @ b16, x + x, torch.softmax(x, -1))
    assert all(torch.equal(g, w) for g, w in zip(got, (a32 @ b32, a16 @ b16, x + x, torch.softmax(x, -1))))
    assert [g.dtype for g in got] == [torch.float32, torch.float16, torch.bfloat16, torch.bfloat16]


def test_under_autocast_forward_and_backward_stay_at_bf16_rounding():
    """A small network trained one step under CPU bf16 autocast: with Fp32Gemms every GEMM, forward and
    backward, goes through it, and loss and grads are as close to an fp64 reference as autocast's own are."""
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.GELU(), torch.nn.Linear(48, 7)).double()
    x, y = torch.randn(32, 24, dtype=torch.float64), torch.randint(0, 7, (32,))

    def step(mode):
        copy = [p.detach().float().requires_grad_() for p in net.parameters()]
        w1, b1, w2, b2 = copy
        with torch.autocast("cpu", dtype=torch.bfloat16), mode:
            h = torch.nn.functional.gelu(torch.nn.functional.linear(x.float(), w1, b1))
            loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w2, b2).float(), y)
        with mode:
            loss.backward()
        return [loss.detach()] + [p.grad for p in copy]

    Counting.calls = 0
    reference = [torch.nn.functional.cross_entropy(net(x), y)]
    reference += list(torch.autograd.grad(reference[0], list(net.parameters())))
    ours, autocast = step(Counting()), step(contextlib.nullcontext())
    assert Counting.calls == 2 * 3 - 1  # two linears forward, grads of both weights and of the hidden layer
    for got, plain, want in zip(ours, autocast, reference):
        err = lambda v: ((v.double() - want).norm() / want.norm()).item()  # noqa: E731
        assert err(got) < 3e-2 and err(got) < 3 * err(plain) + 1e-3


def test_the_way_follows_the_cpu_unless_the_environment_chooses(monkeypatch):
    flags = set()
    with open("/proc/cpuinfo") as f:  # an independent look at the CPU's instructions
        for line in f:
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
    emulated = "avx512_bf16" not in flags and "amx_tile" not in flags  # (this test runs on x86 machines)
    monkeypatch.delenv(precision.ENV, raising=False)
    assert precision.emulated_cpu_bf16() == emulated
    assert precision.cpu_bf16_gemm() == ("fp32" if emulated else "onednn")
    for choice in ("onednn", "fp32"):
        monkeypatch.setenv(precision.ENV, choice)
        assert precision.cpu_bf16_gemm() == choice
    monkeypatch.setenv(precision.ENV, "fp16")
    with pytest.raises(ValueError, match=r"^LRDIST_CPU_BF16_GEMM='fp16': choose from auto, onednn, fp32$"):
        precision.cpu_bf16_gemm()


def test_the_runner_computes_and_records_its_bf16_gemms_as_chosen(monkeypatch, minilm_path, glue_dir):
    runner = SequentialRunner(minilm_path, "rte,mrpc", TINY, data_dir=glue_dir, progress=False)
    batch = next(runner.train["rte"].batches(8, runner.pad_id))
    seen = []
    for choice in ("fp32", "onednn"):
        monkeypatch.setenv(precision.ENV, choice)
        with runner._autocast():
            seen.append(type(_get_current_dispatch_mode()))
        loss = runner._loss("rte", batch)
        loss.register_hook(lambda g: seen.append(type(_get_current_dispatch_mode())) or g)
        runner._backward(loss)
        ident = identity.make(minilm_path, ["rte"], TINY, glue_dir, "cpu")
        assert ident["versions"]["cpu_bf16_gemm"] == choice
    assert seen == [precision.Fp32Gemms, precision.Fp32Gemms, type(None), type(None)]
    plain = identity.make(minilm_path, ["rte"], replace(TINY, precision="fp32"), glue_dir, "cpu")
    assert "cpu_bf16_gemm" not in plain["versions"]  # nothing to say where nothing ran in bf16
    # a file from before the field: its bf16 GEMMs were oneDNN's, the only way then
    older = {**ident, "versions": {k: v for k, v in ident["versions"].items() if k != "cpu_bf16_gemm"}}
    assert identity.upgrade(older)["versions"]["cpu_bf16_gemm"] == "onednn"
    assert identity.check(older, ident, "x", "y") is None
    monkeypatch.setenv(precision.ENV, "fp32")
    now = identity.make(minilm_path, ["rte"], TINY, glue_dir, "cpu")
    assert identity.check(older, now, "x", "y") == "cpu_bf16_gemm onednn then, fp32 now"  # warned, not refused


def test_a_run_resumed_with_other_gemms_says_so(monkeypatch, capsys, tmp_path, minilm_path, glue_dir):
    runner = SequentialRunner(minilm_path, "rte,mrpc", TINY, data_dir=glue_dir, progress=False)
    from lrdist.methods import Flat
    monkeypatch.setenv(precision.ENV, "onednn")
    assert runner.run(Flat(), output=tmp_path, stop_after=1)["status"] == "stopped"
    capsys.readouterr()
    monkeypatch.setenv(precision.ENV, "fp32")
    res = runner.run(Flat(), output=tmp_path, resume=True)
    err = capsys.readouterr().err
    assert f"warning: the checkpoint in {tmp_path} was made with other software (cpu_bf16_gemm onednn then, fp32 now)" in err
    assert len(res["accuracy_matrix"]) == 2
