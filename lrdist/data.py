"""GLUE tasks from the hub id ``nyu-mll/glue`` or a local folder in the same parquet layout.

Local layout: ``<dir>/<task>/<split>-00000-of-00001.parquet`` (any ``<split>-*.parquet``). The folder comes
from ``data_dir``, else the ``LRDIST_GLUE_DIR`` environment variable, else the hub. Each split is
tokenised once (no padding) and kept in memory; batches are padded to their own longest row.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

HUB_ID = "nyu-mll/glue"


@dataclass(frozen=True)
class TaskSpec:
    text_a: str
    text_b: str | None
    num_labels: int
    eval_split: str
    metric: str  # the task's GLUE metric besides accuracy


TASKS = {
    "sst2": TaskSpec("sentence", None, 2, "validation", "accuracy"),
    "cola": TaskSpec("sentence", None, 2, "validation", "matthews"),
    "mrpc": TaskSpec("sentence1", "sentence2", 2, "validation", "f1"),
    "rte": TaskSpec("sentence1", "sentence2", 2, "validation", "accuracy"),
    "qnli": TaskSpec("question", "sentence", 2, "validation", "accuracy"),
    "qqp": TaskSpec("question1", "question2", 2, "validation", "f1"),
    "mnli": TaskSpec("premise", "hypothesis", 3, "validation_matched", "accuracy"),
}


def task_spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; choose from {', '.join(TASKS)}")
    return TASKS[task]


def parse_tasks(tasks: str | list[str]) -> list[str]:
    names = [t.strip().lower() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if len(names) < 2:
        raise ValueError(f"sequential fine-tuning needs two or more tasks, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"a task appears twice in {names}")
    for t in names:
        task_spec(t)
    return names


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The local GLUE folder to use, or None for the hub. A folder that was named must exist."""
    chosen = data_dir if data_dir is not None else os.environ.get("LRDIST_GLUE_DIR")
    if chosen is None or str(chosen) in ("", "hub", HUB_ID):
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"GLUE data folder {path} does not exist")
    return path


def split_file(data_dir: Path, task: str, split: str) -> Path:
    folder = data_dir / task
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder for task {task!r} in {data_dir} (expected {folder})")
    files = sorted(folder.glob(f"{split}-*.parquet"))
    if not files:
        have = sorted({f.name.split("-")[0] for f in folder.glob("*.parquet")})
        raise FileNotFoundError(f"no {split!r} split for task {task!r} in {folder} (found: {have})")
    return files[0]


def load_split(task: str, split: str, data_dir: str | os.PathLike | None = None):
    """One GLUE split as a ``datasets.Dataset``."""
    import datasets
    task_spec(task)
    local = resolve_data_dir(data_dir)
    if local is None:
        return datasets.load_dataset(HUB_ID, task, split=split)
    return datasets.load_dataset("parquet", data_files={split: str(split_file(local, task, split))}, split=split)


@dataclass
class Encoded:
    """A tokenised split: unpadded token lists per field, and labels."""

    task: str
    split: str
    features: dict  # field -> list[list[int]]
    labels: torch.Tensor
    idx: list | None = None  # each row's ``idx`` in its parquet split (for checking which rows were used)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, pad_id: int, shuffle: bool = False, generator=None, by_length=False,
                buckets: int = 0):
        """Yield padded batches (dicts of tensors plus "labels"); padding per batch, not per dataset.

        ``buckets`` > 1 (with ``shuffle``): the shuffled rows are sorted by length within windows of that many
        batches and the batches are then shuffled, so each batch pads little and the order stays random."""
        n = len(self)
        lengths = [len(x) for x in self.features["input_ids"]]
        if shuffle:
            order = torch.randperm(n, generator=generator).tolist()
        elif by_length:  # evaluation: group similar lengths to pad less; order does not matter
            order = sorted(range(n), key=lengths.__getitem__)
        else:
            order = list(range(n))
        starts = list(range(0, n, batch_size))
        if shuffle and buckets > 1:
            window = buckets * batch_size
            order = [i for s in range(0, n, window) for i in sorted(order[s:s + window], key=lengths.__getitem__)]
            starts = [starts[k] for k in torch.randperm(len(starts), generator=generator).tolist()]
        for start in starts:
            idx = order[start:start + batch_size]
            yield collate(self, idx, pad_id)


def collate(data: Encoded, idx: list[int], pad_id: int) -> dict:
    width = max(len(data.features["input_ids"][i]) for i in idx)
    batch = {}
    for field, rows in data.features.items():
        fill = pad_id if field == "input_ids" else 0
        out = torch.full((len(idx), width), fill, dtype=torch.long)
        for j, i in enumerate(idx):
            out[j, : len(rows[i])] = torch.as_tensor(rows[i])
        batch[field] = out
    batch["labels"] = data.labels[idx]
    return batch


HELDOUT = "heldout"  # a pseudo-split: a fixed slice of the train split that training never sees


def heldout_rows(n_train: int, heldout_samples: int) -> int:
    """Rows of the train split set aside for scoring: at most a fifth of it."""
    return min(heldout_samples, n_train // 5)


_CACHE: dict = {}


def encode(tokenizer, task: str, split: str, max_length: int, max_samples: int | None = None,
           data_dir=None, subset_seed: int = 0, heldout_samples: int = 0) -> Encoded:
    """Tokenise a split once (cached in memory). ``max_samples`` takes a seeded random subset.

    The train split is shuffled once (``subset_seed``) and its last ``heldout_rows(...)`` rows are set
    aside: ``split="train"`` takes up to ``max_samples`` rows from the front, ``split="heldout"`` up to
    ``max_samples`` from that tail. The two never overlap, and neither touches the validation split, so a
    search can be scored on the held-out slice while final numbers come from validation.
    """
    key = (getattr(tokenizer, "name_or_path", id(tokenizer)), task, split, max_length, max_samples,
           str(resolve_data_dir(data_dir)), subset_seed, heldout_samples)
    if key in _CACHE:
        return _CACHE[key]
    spec = task_spec(task)
    ds = select_rows(task, split, max_samples, data_dir, subset_seed, heldout_samples)
    a = list(ds[spec.text_a])  # datasets >= 4 returns a lazy Column
    b = list(ds[spec.text_b]) if spec.text_b else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    features = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    labels = torch.tensor(list(ds["label"]), dtype=torch.long)
    if (labels < 0).any():
        raise ValueError(f"{task}/{split} has no labels (a GLUE test split?); use a labelled split")
    idx = list(ds["idx"]) if "idx" in ds.column_names else None
    _CACHE[key] = Encoded(task, split, features, labels, idx)
    return _CACHE[key]


def select_rows(task: str, split: str, max_samples: int | None = None, data_dir=None, subset_seed: int = 0,
                heldout_samples: int = 0):
    """The rows ``encode`` tokenises, as a ``datasets.Dataset`` (its row choice, described there)."""
    if heldout_samples < 0:
        raise ValueError(f"heldout_samples must be >= 0, got {heldout_samples}")
    task_spec(task)
    if split in ("train", HELDOUT):
        ds = load_split(task, "train", data_dir).shuffle(seed=subset_seed)
        reserved = heldout_rows(len(ds), heldout_samples)
        if split == HELDOUT:
            if reserved == 0:
                raise ValueError(f"no held-out rows for {task}: heldout_samples is 0 or the train split is tiny")
            rows = range(len(ds) - reserved, len(ds))
        else:
            rows = range(len(ds) - reserved)
        if max_samples is not None:
            rows = rows[:max_samples]
        ds = ds.select(rows)
    else:
        ds = load_split(task, split, data_dir)
        if max_samples is not None and max_samples < len(ds):
            ds = ds.shuffle(seed=subset_seed).select(range(max_samples))
    return ds
