"""A real model: all-MiniLM-L6-v2 with a region per encoder layer, ours against torch AdamW groups."""
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from lrdist import FusedRegionAdamW
from lrdist.regions import param_groups

SCALES = [0.2, 1.0, 0.5, 2.0, 1.5, 0.7, 3.0, 1.0]  # embeddings, layers 0-5, pooler


# fp64: in fp32 Adam turns last-bit differences of op order into visible ones on elements whose grads
# are ~0 (their normalised update flips). The torch path in fp32 runs the very op of torch's fused
# AdamW, so there the weights must be bit-identical.
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float64),
                                           ("torch", torch.float32)])
def test_minilm_three_steps_same_weights_as_torch_adamw(minilm_path, device, backend, dtype):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["the cat sat on the mat", "sequential fine-tuning forgets", "a third, longer sentence here"],
                padding=True, return_tensors="pt").to(device)
    models = [AutoModel.from_pretrained(minilm_path).to(device, dtype).eval() for _ in range(2)]
    ours_groups = param_groups(models[0], "layers", weight_decay=0.01, no_decay=("bias", "LayerNorm"))
    # The reference: one torch group per (region, decay) with lr x scale, written without lrdist.
    layer_of = lambda n: 0 if n.startswith("embeddings") else 7 if n.startswith("pooler") else 1 + int(n.split(".")[2])
    ref_groups = {}
    for name, p in models[1].named_parameters():
        no_decay = "bias" in name or "LayerNorm" in name
        key = (layer_of(name), no_decay)
        ref_groups.setdefault(key, dict(params=[], lr=1e-3 * SCALES[key[0]], weight_decay=0.0 if no_decay else 0.01))
        ref_groups[key]["params"].append(p)
    assert sorted((g["region"], g["weight_decay"] == 0.0) for g in ours_groups) == sorted(ref_groups)

    opts = [FusedRegionAdamW(ours_groups, lr=1e-3, region_scales=SCALES, backend=backend, block_size=16384),
            torch.optim.AdamW(list(ref_groups.values()), lr=1e-3, fused=dtype == torch.float32)]
    for _ in range(3):
        for model, opt in zip(models, opts):
            out = model(**batch)
            loss = out.last_hidden_state.pow(2).mean() + out.pooler_output.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    moved = 0
    initial = AutoModel.from_pretrained(minilm_path).state_dict()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        if dtype == torch.float32:
            assert torch.equal(a, b), name
        else:
            # Attention key biases have an exactly-zero true gradient (softmax ignores a shift), so
            # autograd hands Adam pure round-off, which it normalises into noise-driven moves.
            atol = 1e-8 if "key.bias" in name else 1e-10
            torch.testing.assert_close(a, b, rtol=1e-10, atol=atol, msg=lambda m: f"{name}: {m}")
        moved += int(not torch.equal(a, initial[name].to(device, dtype)))
    assert moved > 90  # the run trained nearly every tensor (some embedding rows see no tokens)
