import pytest
import torch
from transformers import AutoTokenizer

from lrdist import data as glue


@pytest.fixture(scope="module")
def tok(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.mark.parametrize("task", list(glue.TASKS))
def test_every_task_loads_from_the_local_folder(tok, glue_dir, task):
    spec = glue.TASKS[task]
    train = glue.encode(tok, task, "train", 64, 40, glue_dir)
    ev = glue.encode(tok, task, spec.eval_split, 64, None, glue_dir)
    raw = glue.load_split(task, spec.eval_split, glue_dir)
    assert len(train) == 40 and len(ev) == len(raw)
    assert set(ev.labels.tolist()) <= set(range(spec.num_labels))
    # pairs tokenise both texts: the separator appears twice
    row = ev.features["input_ids"][0]
    assert row.count(tok.sep_token_id) == (2 if spec.text_b else 1)
    batches = list(train.batches(16, tok.pad_token_id, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(b["labels"]) for b in batches] == [16, 16, 8]
    for b in batches:  # padded to the batch's own longest row, not to max_length
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == lengths.max()
        assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()


def test_caps_are_seeded_subsets_and_tokenisation_is_cached(tok, glue_dir):
    a = glue.encode(tok, "rte", "train", 64, 32, glue_dir)
    assert glue.encode(tok, "rte", "train", 64, 32, glue_dir) is a  # cached, not re-tokenised
    full = glue.load_split("rte", "train", glue_dir)
    texts = set(full["sentence1"])
    decoded = tok.decode(a.features["input_ids"][0], skip_special_tokens=True)
    assert any(decoded[:30].lower() in t.lower() for t in texts)


def test_clear_errors(glue_dir, tmp_path, tok):
    with pytest.raises(ValueError, match="unknown GLUE task 'sst3'"):
        glue.parse_tasks("rte,sst3")
    with pytest.raises(ValueError, match="two or more tasks"):
        glue.parse_tasks("rte")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        glue.load_split("rte", "train", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no folder for task 'rte'"):
        glue.load_split("rte", "train", tmp_path)
    (tmp_path / "rte").mkdir()
    with pytest.raises(FileNotFoundError, match="no 'validation' split"):
        glue.load_split("rte", "validation", tmp_path)


def test_length_buckets_keep_every_row_once_and_pad_less(tok, glue_dir):
    data = glue.encode(tok, "qnli", "train", 128, 320, glue_dir)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731

    def epoch(buckets):
        return list(data.batches(16, tok.pad_token_id, shuffle=True, generator=gen(), buckets=buckets))
    plain, bucketed = epoch(0), epoch(8)
    rows = lambda bs: sorted(tuple(r[m.bool()].tolist()) for b in bs for r, m in zip(b["input_ids"], b["attention_mask"]))  # noqa: E731
    assert rows(bucketed) == rows(plain)  # the same rows, each once
    assert sorted(torch.cat([b["labels"] for b in bucketed]).tolist()) == sorted(data.labels.tolist())
    padded = lambda bs: sum(b["input_ids"].numel() for b in bs)  # noqa: E731
    assert padded(bucketed) < 0.9 * padded(plain)  # similar lengths together: less padding
    # each window of 8 batches is sorted by length, then batches are shuffled: not sorted overall
    widths = [b["input_ids"].shape[1] for b in bucketed]
    assert widths != sorted(widths)
    assert [b["input_ids"].tolist() for b in epoch(8)] == [b["input_ids"].tolist() for b in bucketed]  # seeded
