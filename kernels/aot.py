"""Compile the kernels ahead of time for NVIDIA GPUs and read what the compiler made of them. No GPU needed.

    python -m lrdist.kernels.aot --arch 80,90,100 --out DIR [--all] [--jobs N]

Each variant (a kernel, a dtype, a set of flags) is compiled for each arch with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, with the launcher's block size, warps
and options (``fused_region_adamw.LAUNCH_OPTIONS``), into ``DIR/<variant>.sm_<arch>.ptx`` and ``.cubin``.
``DIR/aot.json`` holds, per variant and arch, what the cubin and the PTX show:

* ``registers``, ``local_bytes``, ``stack_bytes``, ``shared_bytes``: ``cuobjdump -res-usage`` (the cuobjdump
  shipped in the Triton wheel); ``spills``: local-memory instructions (LDL/STL) in ``cuobjdump -sass``;
  ``sass``: the count of each global, local and barrier instruction there (LDG.E.128 is a 16-byte load);
* ``read_bytes_per_element`` / ``written_bytes_per_element`` / ``bytes_per_element``, ``load_bits`` /
  ``store_bits``: the global loads and stores of the unmasked path (a full block), from the PTX: those whose
  address depends on the thread index (one per element or vector of elements, not the per-program table
  reads) and that carry no predicate (the masked path predicates each one), summed per thread and divided
  by the elements a thread owns. The floor, AdamW reading param, grad, exp_avg and exp_avg_sq and writing
  three of them, is 28 bytes in fp32 and 14 in bf16; an optional term adds its own tensors;
* ``approx_f32``: approximate or flush-to-zero float32 instructions in the PTX (``sqrt.approx``,
  ``div.full``, ``div.approx``, ``rcp.approx``, any ``.ftz.f32``): the update must have none;
* ``atomics`` and ``atomics_after_barrier``: atomics whose result is read (``atom.*``: the step kernel's
  arrival counters; the norm's accumulation is a ``red.*``), and those preceded in their basic block by a CTA
  barrier with no memory access in between (the step counter relies on it); ``atomics_after_kernel_barrier``:
  the same read in Triton's IR before lowering, i.e. barriers the kernel asks for itself (Triton 3.9 adds
  one before a release atomic while lowering, an implementation detail the kernel does not lean on).

Variant names say the kernel (``adamw``: the step; ``sumsq``: the clipping norm), the dtype and the flags,
e.g. ``adamw-fp32-amsgrad-clip`` or ``sumsq-bf16-ewc``. By default a covering subset (each dtype and each
flag at least once, in both kernels); ``--all`` compiles every variant the launchers can launch.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lrdist.kernels import fused_region_adamw as K

ARCHS = (80, 86, 87, 89, 90, 100, 103, 120, 121)  # what the ptxas in Triton 3.9's wheel targets, from Ampere on
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# Per kernel, each flag and the constexpr it sets (the value it takes when the flag is in the name).
FLAGS = {
    "adamw": {"amsgrad": ("AMSGRAD", True), "scale": ("HAS_GRAD_SCALE", True), "inf": ("HAS_FOUND_INF", True),
              "migu": ("MIGU", True), "ewc": ("EWC", True), "clip": ("CLIP", True), "tensorlr": ("TENSOR_LR", True),
              "unaligned": ("ALIGNED", False)},
    "sumsq": {"scale": ("HAS_GRAD_SCALE", True), "migu": ("MIGU", True), "ewc": ("EWC", True),
              "unaligned": ("ALIGNED", False)},
}
# The kernels' runtime arguments, typed as the launchers pass them (grad_scale and found_inf: GradScaler's fp32).
SIGNATURES = {
    "adamw": dict(ptrs="*i64", meta="*i64", block_tensor="*i64", hyper="*fp64", region_scales="*fp64",
                  arrivals="*i32", grad_scale_ptr="*fp32", found_inf_ptr="*fp32", ewc_lambda_ptr="*fp64",
                  norm_acc="*fp64", clip_ptr="*fp64", norm_out="*fp32", step_arrivals="*i32", step_programs="i32",
                  lr_table="*i64"),
    "sumsq": dict(ptrs="*i64", meta="*i64", block_tensor="*i64", grad_scale_ptr="*fp32", ewc_lambda_ptr="*fp64",
                  norm_acc="*fp64"),
}
SUBSET = ("adamw-fp32", "adamw-bf16", "adamw-fp16-amsgrad-scale-inf", "adamw-fp64-clip-tensorlr",
          "adamw-fp32-amsgrad-scale-inf-migu-ewc-clip-tensorlr", "adamw-bf16-amsgrad-migu-ewc-clip",
          "adamw-fp32-unaligned", "sumsq-fp32", "sumsq-bf16-scale-migu-ewc", "sumsq-fp16-unaligned", "sumsq-fp64-ewc")


class AotError(ValueError):
    """A bad argument or a failed compile: printed as one line."""


@dataclass(frozen=True)
class Variant:
    kernel: str
    dtype: str
    flags: tuple  # in FLAGS order

    @property
    def name(self) -> str:
        return "-".join((self.kernel, self.dtype) + self.flags)

    @staticmethod
    def parse(name: str) -> "Variant":
        kernel, dtype, *flags = name.split("-") + [""]
        flags = [f for f in flags if f]
        known = FLAGS.get(kernel, {})
        if kernel not in FLAGS or dtype not in DTYPES or any(f not in known for f in flags):
            raise AotError(f"unknown variant {name!r}: <kernel>-<dtype>[-flag...], kernel in {sorted(FLAGS)}, "
                           f"dtype in {sorted(DTYPES)}")
        return Variant(kernel, dtype, tuple(f for f in known if f in flags))

    def constexprs(self) -> dict:
        const = dict(BLOCK=K.DEFAULT_BLOCK, DTYPE=K._TL_DTYPES[DTYPES[self.dtype]])
        for flag, (key, value) in FLAGS[self.kernel].items():
            const[key] = value if flag in self.flags else not value
        return const


def all_variants() -> list:
    out = []
    for kernel, flags in FLAGS.items():
        for dtype in DTYPES:
            for picks in itertools.product((False, True), repeat=len(flags)):
                out.append(Variant(kernel, dtype, tuple(f for f, on in zip(flags, picks) if on)))
    return out


def parse_archs(text: str) -> list:
    archs = []
    for part in text.split(","):
        part = part.strip().removeprefix("sm_")
        if not part.isdigit() or int(part) not in ARCHS:
            raise AotError(f"--arch: {repr(part) if part else 'an empty entry'} is not a supported arch; give a comma-separated "
                           f"list of {', '.join(map(str, ARCHS))}")
        archs.append(int(part))
    return sorted(set(archs))


def nvidia_tool(name: str) -> str:
    """A CUDA binary shipped in the Triton wheel (TRITON_<NAME>_PATH overrides, as in Triton)."""
    return getattr(triton.knobs.nvidia, name).path


# ---- reading the PTX ------------------------------------------------------------------------------------
_REG = re.compile(r"%[A-Za-z_][\w]*(?:\.[xyz])?")
_NO_DEST = ("st.", "red.", "bar.", "barrier.", "bra", "ret", "exit", "membar", "fence", "prefetch", "trap")
_APPROX_F32 = re.compile(r"\b(?:[a-z0-9]+\.approx(?:\.ftz)?\.f32|div\.full(?:\.ftz)?\.f32|[a-z0-9.]+\.ftz\.f32)\b")


def ptx_instructions(ptx: str) -> list:
    """(label or None, guard, opcode, operands) per instruction or label, in order; directives and comments dropped."""
    out = []
    statements = []
    for line in ptx.splitlines():
        line = line.split("//")[0].strip()
        if re.fullmatch(r"\$?[\w.$]+:", line):
            statements.append(line)
        else:  # "{ .reg .b32 t; mov.b64 {t, %r1}, %rd1; }" holds two statements
            statements += [s.strip().lstrip("{").strip() for s in line.split(";")]
    for line in statements:
        if line.endswith(":"):
            out.append((line[:-1], None, None, []))
            continue
        m = re.match(r"(@!?%\w+\s+)?([a-z][\w.:]*)\s*(.*)$", line)
        if m is None:
            continue
        depth, operands, cur = 0, [], ""
        for ch in m.group(3):  # split on top-level commas: "{ %r1, %r2 }" and "[ %rd1 + 0 ]" stay whole
            depth += ch in "{[" and 1 or ch in "}]" and -1 or 0
            if ch == "," and depth == 0:
                operands.append(cur.strip())
                cur = ""
            else:
                cur += ch
        if cur.strip():
            operands.append(cur.strip())
        out.append((None, (m.group(1) or "").strip(), m.group(2), operands))
    return out


def thread_dependent(instrs: list) -> set:
    """Registers whose value depends on the thread index (a flow-insensitive fixed point over the PTX)."""
    tainted: set = set()
    changed = True
    while changed:
        changed = False
        for label, guard, op, operands in instrs:
            if label is not None or not operands or op.startswith(_NO_DEST):
                continue
            dests = set(_REG.findall(operands[0]))  # "%p1|%p2" (setp) and "{ %r1, %r2 }" name several
            sources = set(_REG.findall(" ".join(operands[1:]) + " " + guard))
            if dests - tainted and any(r in tainted or r.startswith("%tid") for r in sources):
                tainted |= dests
                changed = True
    return tainted


def _bits(op: str) -> int:
    vec, width = 1, 0
    for part in op.split("."):
        if part in ("v2", "v4", "v8"):
            vec = int(part[1:])
        elif re.fullmatch(r"[bsuf](8|16|32|64|128)", part):
            width = int(part[1:])
    return vec * width


def unmasked_accesses(instrs: list) -> tuple:
    """(load bits, store bits) of each unpredicated global access whose address depends on the thread."""
    tainted = thread_dependent(instrs)
    loads, stores = [], []
    for label, guard, op, operands in instrs:
        if label is not None or guard or not op.startswith(("ld.global", "st.global")):
            continue
        address = next((o for o in operands if o.startswith("[")), "")
        if set(_REG.findall(address)) & tainted:
            (loads if op.startswith("ld.") else stores).append(_bits(op))
    return loads, stores


def barrier_before_atomics(instrs: list) -> tuple:
    """(atomics, those with a bar.sync/barrier before them in their basic block and no memory access between)."""
    atomics = covered = 0
    for i, (label, _, op, _) in enumerate(instrs):
        if label is not None or not op.startswith("atom."):
            continue
        atomics += 1
        for prev_label, _, prev, _ in reversed(instrs[:i]):
            if prev_label is not None or prev.startswith(("bra", "ld.", "st.", "atom.", "red.")):
                break
            if prev.startswith(("bar.sync", "barrier.sync", "bar.red", "barrier.red")):
                covered += 1
                break
    return atomics, covered


def ir_barrier_before_atomics(ttir: str) -> int:
    """Atomics of Triton's IR (before lowering) preceded in their block by the kernel's own barrier
    (``tl.debug_barrier()``, ``ttg.barrier``) with no memory access or region boundary between. Triton 3.9 also
    puts a bar.sync before a release atomic while lowering; a kernel must not rely on that."""
    lines = [line.strip() for line in ttir.splitlines()]
    covered = 0
    for i, line in enumerate(lines):
        if "tt.atomic_" not in line:
            continue
        for prev in reversed(lines[:i]):
            if "barrier" in prev:
                covered += 1
                break
            if prev.startswith("}") or prev.endswith("{") or any(op in prev for op in ("tt.load", "tt.store", "tt.atomic_")):
                break
    return covered


# ---- reading the cubin ----------------------------------------------------------------------------------
def cubin_resources(path: Path) -> dict:
    out = subprocess.run([nvidia_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                         check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out.split("Function", 1)[-1]))
    return {k: int(v) for k, v in fields.items()}


def sass_counts(path: Path) -> dict:
    out = subprocess.run([nvidia_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                         check=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?((?:LDG|STG|LDL|STL|ATOMG|ATOM|RED|BAR)[\w.]*)", out)
    return {op: ops.count(op) for op in sorted(set(ops))}


# ---- compiling ------------------------------------------------------------------------------------------
def compile_variant(variant: Variant, arch: int, out: Path, **options) -> dict:
    """Compile one variant for one arch, write its PTX and cubin, and read them. ``options`` override the
    launch options (tests compile with FMA contraction on, to show the launches' pinning matters)."""
    fn = {"adamw": K._fused_region_adamw_kernel, "sumsq": K._grad_sumsq_kernel}[variant.kernel]
    signature = SIGNATURES[variant.kernel]
    const = variant.constexprs()
    # As the JIT does for torch's allocations: every pointer argument is 16-byte aligned.
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items() if v.startswith("*")}
    warps = K.num_warps(K.DEFAULT_BLOCK, DTYPES[variant.dtype], aligned="unaligned" not in variant.flags)
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in const}},
                                            constexprs=const, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=warps, **{**K.LAUNCH_OPTIONS, **options}))
    except Exception as exc:  # noqa: BLE001 - the compiler's own message, on one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise AotError(f"{variant.name} for sm_{arch} does not compile: {first}") from exc
    stem = f"{variant.name}.sm_{arch}"
    ptx, cubin = compiled.asm["ptx"], out / f"{stem}.cubin"
    (out / f"{stem}.ptx").write_text(ptx)
    cubin.write_bytes(compiled.asm["cubin"])

    res = cubin_resources(cubin)
    sass = sass_counts(cubin)
    instrs = ptx_instructions(ptx)
    found = _APPROX_F32.findall(ptx)
    loads, stores = unmasked_accesses(instrs)
    atomics, covered = barrier_before_atomics(instrs)
    kernel_barriers = ir_barrier_before_atomics(compiled.asm["ttir"])
    per_thread = K.DEFAULT_BLOCK // (32 * warps)
    read, written = sum(loads) / 8 / per_thread, sum(stores) / 8 / per_thread
    return dict(
        registers=res["REG"], spills=sum(n for op, n in sass.items() if op.startswith(("LDL", "STL"))),
        local_bytes=res["LOCAL"], stack_bytes=res["STACK"], shared_bytes=res["SHARED"],
        read_bytes_per_element=read, written_bytes_per_element=written, bytes_per_element=read + written,
        load_bits=sorted(set(loads)), store_bits=sorted(set(stores)), elements_per_thread=per_thread,
        num_warps=warps, sass=sass, approx_f32={op: found.count(op) for op in sorted(set(found))}, atomics=atomics,
        atomics_after_barrier=covered, atomics_after_kernel_barrier=kernel_barriers,
        fma={op: ptx.count(op + " ") for op in ("fma.rn.f32", "fma.rn.f64")})  # f64 ones: libdevice's exp/log


def _compile_job(job):
    name, arch, out = job
    t0 = time.perf_counter()
    figures = compile_variant(Variant.parse(name), arch, Path(out))
    return name, arch, figures, time.perf_counter() - t0


def run(archs: list, out: Path, variants: list, jobs: int = 1, log=print) -> dict:
    """Compile ``variants`` for ``archs`` into ``out`` and write ``out/aot.json``; returns what it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [(v.name, arch, str(out)) for v in variants for arch in archs]
    result = {"triton": triton.__version__, "block": K.DEFAULT_BLOCK, "options": K.LAUNCH_OPTIONS, "archs": archs,
              "variants": {v.name: {"kernel": v.kernel, "dtype": v.dtype, "flags": list(v.flags)} for v in variants}}
    t0 = time.perf_counter()
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_compile_job, todo))
    else:
        done = [_compile_job(job) for job in todo]
    for name, arch, figures, _ in done:
        result["variants"][name][f"sm_{arch}"] = figures
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "aot.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    log(f"compiled {len(variants)} variants for {', '.join(f'sm_{a}' for a in archs)} in {result['seconds']} s "
        f"into {out}")
    return result


def table(result: dict) -> str:
    """The markdown table of RESULTS.md's "compiled for GPUs": a row per variant, a value per arch where they
    differ."""
    archs = [f"sm_{a}" for a in result["archs"]]

    def per_arch(v, show):
        values = [show(v[a]) for a in archs]
        return values[0] if len(set(values)) == 1 else " / ".join(values)
    rows = [f"| variant | registers ({' / '.join(archs)}) | local memory, spills | bytes per element (read + written) "
            f"| vector bits (loads; stores) |", "|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        registers = " / ".join(str(v[a]["registers"]) for a in archs)
        local = per_arch(v, lambda f: f"{f['local_bytes']} B, {f['spills']}")
        moved = per_arch(v, lambda f: f"{f['bytes_per_element']:g} ({f['read_bytes_per_element']:g} + "
                                      f"{f['written_bytes_per_element']:g})")
        bits = per_arch(v, lambda f: f"{'/'.join(map(str, f['load_bits']))}; {'/'.join(map(str, f['store_bits'])) or '-'}")
        rows.append(f"| {name} | {registers} | {local} | {moved} | {bits} |")
    return "\n".join(rows)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None) -> int:
    parser = _Parser(prog="python -m lrdist.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, help="comma-separated compute capabilities, e.g. 80,90,100")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PTX, cubins and aot.json")
    parser.add_argument("--all", action="store_true", help="every variant, not the covering subset")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel")
    parser.add_argument("--table", action="store_true", help="also print the markdown table of RESULTS.md")
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        archs = parse_archs(args.arch)
        if args.jobs < 1:
            raise AotError(f"--jobs must be at least 1, got {args.jobs}")
        if args.out.exists() and not args.out.is_dir():
            raise AotError(f"--out {args.out} exists and is not a folder")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            raise AotError("TRITON_INTERPRET is set: the kernels are interpreted, not compiled; unset it")
        result = run(archs, args.out, all_variants() if args.all else [Variant.parse(n) for n in SUBSET], args.jobs)
    except (AotError, OSError, subprocess.CalledProcessError) as exc:
        print(f"{prog}: error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
              file=sys.stderr)
        return 2
    if args.table:
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
