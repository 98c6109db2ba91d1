"""The kernels folder must not clash with Hugging Face's `kernels` package, installed or not."""
import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

# Runs from the repository root, so the root is first on sys.path: the case where a top-level
# `kernels` package of ours would shadow Hugging Face's.
SCRIPT = textwrap.dedent("""
    import os, importlib.util
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, transformers
    from transformers.utils import import_utils
    spec = importlib.util.find_spec("kernels")
    origin = "none" if spec is None else ("namespace" if spec.origin in (None, "namespace") else spec.origin)
    available = import_utils.is_kernels_available()
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    model = transformers.BertForSequenceClassification(cfg)
    from lrdist import FusedRegionAdamW
    from lrdist.regions import param_groups
    opt = FusedRegionAdamW(param_groups(model), backend="triton", block_size=256)
    before = model.classifier.weight.detach().clone()
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([1])).loss.backward()
    opt.step()
    assert not torch.equal(before, model.classifier.weight)
    print(origin, available)
""")


def hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("hf_kernels", [True, False], ids=["with-hf-kernels", "without-hf-kernels"])
def test_transformers_and_our_kernels_side_by_side(hf_kernels):
    if hf_kernels != hf_kernels_installed():
        pytest.skip(f"Hugging Face `kernels` is {'not ' if hf_kernels else ''}installed here")
    assert not (REPO / "kernels" / "__init__.py").exists()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    origin, available = run.stdout.split()[-2:]
    if hf_kernels:
        assert "site-packages" in origin  # theirs wins over our folder
    else:
        assert origin == "namespace" and available == "False"  # our folder is no package to transformers
