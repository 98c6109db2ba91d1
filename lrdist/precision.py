"""How bf16 autocast's matrix products run on a CPU.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` a linear layer multiplies bf16 inputs and weights,
accumulates in fp32 and rounds the result to bf16. On an x86 CPU with bf16 instructions (AVX512-BF16 or
AMX) oneDNN does this faster than an fp32 product. Without them oneDNN emulates the bf16 product: on an
Intel Xeon without them a bf16 run of the fast recipe took 2.96 times as long as an fp32 run
(benchmarks/SCIENCE.md §4.1, amendment 2).

The same arithmetic (products of bf16 values, fp32 accumulation, one rounding to bf16) is then done
faster as an fp32 GEMM of the bf16 values: ``Fp32Gemms`` does that for every bf16 mm, addmm, bmm and
baddbmm while it is active, forward and backward (the linear layers' products). Every other op runs as
autocast runs it, attention (SDPA's fused kernel) among them. The results differ from oneDNN's in the
order of the fp32 sums only, so at the level of bf16 rounding, as results on two machines do; that run
took 0.42 of oneDNN's time.

``cpu_bf16_gemm()`` says which way a run takes: ``LRDIST_CPU_BF16_GEMM=onednn|fp32`` chooses, else
(``auto``) fp32 GEMMs on an x86 CPU without AVX512-BF16 and AMX, and oneDNN elsewhere (other CPUs are
left to it: lrdist does not know their bf16 instructions).
"""
from __future__ import annotations

import contextlib
import os
import platform

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ENV = "LRDIST_CPU_BF16_GEMM"
CHOICES = ("auto", "onednn", "fp32")

_aten = torch.ops.aten
_GEMMS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}


def emulated_cpu_bf16() -> bool:
    """Whether oneDNN would emulate bf16 products here: an x86 CPU without AVX512-BF16 and AMX tiles."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return x86 and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_bf16_gemm() -> str:
    """``onednn`` or ``fp32``: how bf16 autocast's GEMMs run on this CPU (see the module's note)."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: choose from {', '.join(CHOICES)}")
    if choice == "auto":
        return "fp32" if emulated_cpu_bf16() else "onednn"
    return choice


class Fp32Gemms(TorchDispatchMode):
    """Runs bf16 CPU GEMMs as fp32 GEMMs of the same bf16 values, rounding the result to bf16 once."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GEMMS and all(a.dtype == torch.bfloat16 and a.device.type == "cpu"
                                  for a in args if isinstance(a, torch.Tensor)):
            wide = [a.float() if isinstance(a, torch.Tensor) else a for a in args]  # exact: bf16 fits fp32
            return func(*wide, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def bf16_gemms(device: torch.device, bf16: bool):
    """The context a training or evaluation pass runs in: ``Fp32Gemms`` for bf16 autocast on a CPU whose
    way (``cpu_bf16_gemm``) is fp32, else nothing."""
    if bf16 and device.type == "cpu" and cpu_bf16_gemm() == "fp32":
        return Fp32Gemms()
    return contextlib.nullcontext()
