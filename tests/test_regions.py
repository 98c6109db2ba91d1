import pytest
import torch
import transformers

from lrdist import FusedRegionAdamW
from lrdist.regions import assign_regions, format_table, param_groups, region_table

# The paper's bert10 partition of a 12-layer BERT, written out by hand.
PAPER_LAYER_GROUPS = [[0, 1], [2], [3, 4], [5], [6, 7], [8], [9, 10], [11]]


def tiny(config_cls, model_cls, layers=12, **kw):
    return model_cls(config_cls(num_hidden_layers=layers, hidden_size=16, num_attention_heads=2,
                                intermediate_size=24, vocab_size=60, **kw))


def test_bert10_matches_the_paper_name_by_name():
    model = tiny(transformers.BertConfig, transformers.BertForSequenceClassification)
    rmap = assign_regions(model, "bert10")
    assert rmap.num_regions == 10
    for name, _ in model.named_parameters():
        if name.startswith("bert.embeddings."):
            expected = 0
        elif name.startswith("bert.encoder.layer."):
            layer = int(name.split(".")[3])
            expected = 1 + next(i for i, g in enumerate(PAPER_LAYER_GROUPS) if layer in g)
        else:
            assert name.startswith(("bert.pooler.", "classifier.")), name
            expected = 9
        assert rmap.region_of[name] == expected, name


@pytest.mark.parametrize("make", [
    lambda: tiny(transformers.BertConfig, transformers.BertForSequenceClassification, 6),
    lambda: tiny(transformers.RobertaConfig, transformers.RobertaForSequenceClassification, 4, pad_token_id=1),
    lambda: tiny(transformers.ElectraConfig, transformers.ElectraForSequenceClassification, 3, embedding_size=8),
    lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        n_layers=5, dim=16, n_heads=2, hidden_dim=24, vocab_size=60)),
    lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=60)),
    lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2,
                                                                   intermediate_size=24, vocab_size=60)),
], ids=["bert", "roberta", "electra", "distilbert", "gpt2", "llama"])
@pytest.mark.parametrize("scheme", ["bert10", "depth:3", "layers"])
def test_every_parameter_in_exactly_one_region(make, scheme):
    model = make()
    groups = param_groups(model, scheme, weight_decay=0.1, no_decay=("bias",))
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # all, and each once
    rmap = assign_regions(model, scheme)
    emb = model.get_input_embeddings().weight
    name_of = {id(p): n for n, p in model.named_parameters()}
    assert rmap.region_of[name_of[id(emb)]] == 0
    # layers move monotonically through the middle regions
    layer_regions = [r for r in rmap.region_of.values() if 0 < r < rmap.num_regions - 1]
    assert layer_regions == sorted(layer_regions) and layer_regions
    FusedRegionAdamW(groups, region_scales=[1.0] * rmap.num_regions)  # the optimizer takes them
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.dim() == 1 and "bias" in name_of[id(p)] for p in g["params"]))


def test_region_table_counts(capsys):
    model = tiny(transformers.BertConfig, transformers.BertForSequenceClassification)
    rows = region_table(model)
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in model.parameters())
    assert [r["tensors"] for r in rows][1:9] == [32, 16, 32, 16, 32, 16, 32, 16]
    assert "layers 0-1" in format_table(rows)


def test_unknown_scheme_and_models_without_layers():
    model = tiny(transformers.BertConfig, transformers.BertModel, 2)
    with pytest.raises(ValueError, match="unknown region scheme"):
        assign_regions(model, "bert11")
    with pytest.raises(ValueError, match="positive integer"):
        assign_regions(model, "depth:0")
    with pytest.raises(ValueError, match="no stack of identical layers"):
        assign_regions(torch.nn.Linear(3, 3))
