"""How bf16 autocast's matrix products run on a CPU.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` a linear layer multiplies bf16 inputs and weights,
accumulates in fp32 and rounds the result to bf16. On a CPU with bf16 instructions (AVX512-BF16 or AMX)
oneDNN does this faster than an fp32 product. Without them oneDNN emulates the bf16 product, and that
costs 3-4 times an fp32 GEMM of the same shape: a MiniLM training step in bf16 took 3.2 s against 0.9 s
in fp32 on such a machine (benchmarks/SCIENCE.md §4.2).

The same arithmetic (products of bf16 values, fp32 accumulation, one rounding to bf16) is then done
faster as an fp32 GEMM of the bf16 values: ``Fp32Gemms`` does that for every bf16 mm, addmm, bmm and
baddbmm while it is active, forward and backward. Every other op, attention among them, runs as autocast
runs it. The results differ from oneDNN's only in the order of the fp32 sums, so at the level of bf16
rounding, as results on two machines do.

``cpu_bf16_gemm()`` says which way a run takes: ``LRDIST_CPU_BF16_GEMM=onednn|fp32`` chooses, else
(``auto``) oneDNN where the CPU has bf16 instructions and fp32 GEMMs where it does not.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ENV = "LRDIST_CPU_BF16_GEMM"
CHOICES = ("auto", "onednn", "fp32")

_aten = torch.ops.aten
_GEMMS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}


def native_cpu_bf16() -> bool:
    """Whether this CPU has bf16 instructions oneDNN uses (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_bf16_gemm() -> str:
    """``onednn`` or ``fp32``: how bf16 autocast's GEMMs run on this CPU (see the module's note)."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: choose from {', '.join(CHOICES)}")
    if choice == "auto":
        return "onednn" if native_cpu_bf16() else "fp32"
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
