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
