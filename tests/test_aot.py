"""What the compiler makes of the kernels for GPUs, without a GPU: `python -m lrdist.kernels.aot` compiles the
covering subset of variants for sm_80, sm_90 and sm_100 once per session, and the tests read its aot.json
(figures from cuobjdump and the PTX) and the PTX itself."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

ARCHS = (80, 90, 100)
SIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


def aot(*args, out):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "lrdist.kernels.aot", *args, "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    run = aot("--arch", ",".join(map(str, ARCHS)), "--jobs", "2", out=out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "TRITON_DEFAULT_FP_FUSION" not in run.stderr  # fusion is pinned, not left to Triton's default
    return out, json.loads((out / "aot.json").read_text())


def each(result, kernel=None):
    for name, v in result["variants"].items():
        if kernel in (None, v["kernel"]):
            for arch in ARCHS:
                yield name, v, arch, v[f"sm_{arch}"]


def test_every_variant_compiles_for_every_arch_with_no_local_memory(compiled):
    out, result = compiled
    from lrdist.kernels.aot import SUBSET
    assert sorted(result["variants"]) == sorted(SUBSET)
    kinds = {(v["kernel"], v["dtype"]) for v in result["variants"].values()}
    assert len(kinds) == 8  # each dtype in both kernels
    for name, _, arch, f in each(result):
        assert (out / f"{name}.sm_{arch}.cubin").stat().st_size > 0 and (out / f"{name}.sm_{arch}.ptx").exists()
        assert f["local_bytes"] == 0 and f["stack_bytes"] == 0 and f["spills"] == 0, (name, arch, f)
        assert 0 < f["registers"] <= 128, (name, arch, f["registers"])


def test_ieee_float32_math_and_no_flush_to_zero(compiled):
    """No sqrt.approx / div.full / div.approx / rcp.approx / .ftz float32 instruction; the step's sqrt and
    divisions are the correctly rounded ones."""
    out, result = compiled
    for name, v, arch, f in each(result):
        assert f["approx_f32"] == {}, (name, arch, f["approx_f32"])
        if v["kernel"] == "adamw" and v["dtype"] != "fp64":
            ptx = (out / f"{name}.sm_{arch}.ptx").read_text()
            assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx


def test_aligned_sets_move_16_bytes_per_access_and_unaligned_ones_do_not(compiled):
    for name, v, arch, f in each(result := compiled[1]):
        if "unaligned" in v["flags"]:  # scalar accesses, one element each
            assert f["load_bits"] == [8 * SIZE[v["dtype"]]], (name, arch, f["load_bits"])
            assert "LDG.E.128" not in f["sass"]
            continue
        gathered = {32} if "migu" in v["flags"] else set()  # the row mask: one float per element's row
        assert 128 in f["load_bits"] and set(f["load_bits"]) - {128} <= gathered, (name, arch, f["load_bits"])
        assert f["sass"].get("LDG.E.128", 0) > 0
        if v["kernel"] == "adamw":
            assert f["store_bits"] == [128] and f["sass"].get("STG.E.128", 0) > 0, (name, arch, f["store_bits"])


def test_bytes_per_element_are_the_floor_plus_each_optional_term(compiled):
    """The floor: AdamW reads param, grad, exp_avg and exp_avg_sq and writes three of them (28 B in fp32, 14 in
    bf16); the norm reads the grad. AMSGrad adds max_exp_avg_sq both ways, grad_scale writes the unscaled grad
    back, EWC reads Fisher and anchor (and, for the norm, the param), MIGU one float32 row mask per element."""
    for name, v, arch, f in each(compiled[1]):
        s, flags = SIZE[v["dtype"]], set(v["flags"])
        if v["kernel"] == "adamw":
            read = s * (4 + ("amsgrad" in flags) + 2 * ("ewc" in flags)) + 4 * ("migu" in flags)
            written = s * (3 + ("amsgrad" in flags) + ("scale" in flags))
        else:
            read, written = s * (1 + 3 * ("ewc" in flags)) + 4 * ("migu" in flags), 0
        assert (f["read_bytes_per_element"], f["written_bytes_per_element"]) == (read, written), (name, arch, f)
    fp32, bf16 = compiled[1]["variants"]["adamw-fp32"], compiled[1]["variants"]["adamw-bf16"]
    assert {fp32[f"sm_{a}"]["bytes_per_element"] for a in ARCHS} == {28}
    assert {bf16[f"sm_{a}"]["bytes_per_element"] for a in ARCHS} == {14}


def test_a_barrier_precedes_each_arrival_atomic(compiled):
    """The step counter's last-arriver protocol needs every warp of a program past its reads before the one
    thread issuing the arrival atomic: a CTA barrier in the atomic's basic block, no memory access between, in
    the PTX, and asked for by the kernel itself (tl.debug_barrier), not left to Triton's lowering."""
    for name, v, arch, f in each(compiled[1], "adamw"):
        assert f["atomics"] == 1 + ("clip" in v["flags"]), (name, arch, f["atomics"])  # tensor arrivals (+ step's)
        assert f["atomics_after_barrier"] == f["atomics"], (name, arch, f)
        assert f["atomics_after_kernel_barrier"] == f["atomics"], (name, arch, f)


@pytest.mark.parametrize("args", [["--arch", "75"], ["--arch", "80,x"], ["--arch", ""], ["--arch", "90", "--jobs", "0"],
                                  ["--arch", "90"]])  # the last: the kernels are interpreted
def test_bad_arguments_are_one_line_errors_and_write_nothing(tmp_path, capsys, monkeypatch, args):
    from lrdist.kernels.aot import main
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as in this process on CPU; on a GPU run it is unset
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err, err
    assert not (tmp_path / "out").exists()


def test_fma_contraction_is_pinned_off_in_what_launches_use(compiled, tmp_path):
    """The launches' options keep every multiply and add rounding as written: no float32 FMA in the step,
    and the float64 ones are only libdevice's (its exp and log in the bias corrections); compiling the same
    variant with contraction on fuses the update's lines, so the pin is what keeps them apart."""
    out, result = compiled
    for name, v, arch, f in each(result, "adamw"):
        assert f["fma"]["fma.rn.f32"] == 0, (name, arch, f["fma"])
    code = ("import json, pathlib, sys; from lrdist.kernels import aot as A; v = A.Variant.parse('adamw-fp32'); "
            "out = pathlib.Path(sys.argv[1]); print(json.dumps([A.compile_variant(v, 90, out)['fma'], "
            "A.compile_variant(v, 90, out, enable_fp_fusion=True)['fma']]))")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    env["PYTHONPATH"] = str(REPO)
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    pinned, fused = json.loads(run.stdout.strip().splitlines()[-1])
    assert pinned == result["variants"]["adamw-fp32"]["sm_90"]["fma"]
    assert sum(fused.values()) > sum(pinned.values()), (pinned, fused)
