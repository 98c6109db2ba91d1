"""The benchmark harnesses run (CI-sized, --quick) and print their tables: correctness only, no timing."""
import subprocess
import sys

from conftest import REPO


def run_script(name, *args):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), "--quick", *args], capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_optimizer_benchmark_quick():
    table = run_script("bench_optimizer.py")
    rows = [line for line in table.splitlines() if line.startswith("| tiny") and "+" not in line.split("|")[3]]
    providers = {line.split("|")[3].strip() for line in rows}
    terms = [line.split("|")[3].strip() for line in table.splitlines()
             if line.startswith("| tiny") and "+" in line.split("|")[3]]
    assert terms == ["lrdist-torch+clip", "clip_grad_norm_+torch-fused-10g", "lrdist-torch+ewc",
                     "ewc-pass+torch-fused-10g", "lrdist-torch+migu", "masked-grads+torch-fused-10g"]
    assert {"lrdist-torch", "torch-fused-10g", "torch-foreach-10g", "torch-fused-1g"} <= providers
    assert len(rows) == 2 * len(providers)  # fp32 and bf16
    for line in rows:
        cells = [c.strip() for c in line.split("|")]
        assert float(cells[5].split()[0]) > 0 and float(cells[6]) > 0  # a time and a bandwidth
    assert "copy bandwidth" in table


def test_trial_benchmark_quick(glue_dir):
    table = run_script("bench_trial.py", "--data-dir", str(glue_dir))
    assert "plain loop" in table and "speed-up per trial" in table


def test_gpu_check_parses_and_its_exactness_part_runs_on_the_cpu():
    """gpu_check.sh cannot run here; its shell must parse and its exactness script must run (--quick: the
    interpreter, the NaN and inf cases against torch's fused AdamW after clip_grad_norm_ checked for real)."""
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")]).returncode == 0
    report = run_script("gpu_exactness.py")
    assert sum(line.endswith("| as torch |") for line in report.splitlines()) == 8
    assert "| float32 | False | 1024.0 | 1 | grad (unscaled) |" in report
    assert report.strip().endswith("all checks passed")


def test_gpu_protocol_counts_steps_per_pair_run(glue_dir):
    """The GPU-protocol estimate (issue 19): steps per pair-run are 3 epochs of ceil(rows / 4) per task on
    GLUE's full training sets; the protocol totals add up; FLOPs grow with the padded tokens."""
    table = run_script("gpu_protocol.py", "--data-dir", str(glue_dir))
    full = {"sst2": 67349, "qqp": 363846, "qnli": 104743, "mnli": 392702, "rte": 2490, "mrpc": 3668, "cola": 8551}
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines() if " → " in line]
    assert len(rows) == 9
    for pair, _, steps, tokens, pflop in rows:
        a, b = pair.split(" → ")
        assert int(steps.replace(",", "")) == sum(3 * -(-full[t] // 4) for t in (a, b))
        assert float(tokens) > 0 and float(pflop) > 0
    assert "| **total** | 1,020 |" in table and "optimizer steps per second" in table


def test_precision_benchmark_quick():
    table = run_script("bench_precision.py")
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "ms" not in line]
    assert rows == ["fp32", "bf16 oneDNN", "bf16 fp32 GEMMs"] and "lrdist's default here:" in table
