"""Checks a command runs before it trains, downloads or writes anything.

Each check reads only: it never creates a folder, a file or a database. A problem is an ``InputError``
whose message is one line naming the option, the problem and the fix; the CLI prints it and exits 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
from pathlib import Path


class InputError(ValueError):
    """Bad input the user can fix: one line, raised before anything changes."""


# ---- numbers (argparse types, so a bad value fails while parsing) ----------------------------------
def whole(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value
    parse.__name__ = f"whole number >= {minimum}"
    return parse


def positive(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def seeds(text: str) -> list[int]:
    """--seeds: distinct comma-separated whole numbers >= 0."""
    values = []
    for part in text.split(","):
        try:
            values.append(int(part))
        except ValueError:
            raise InputError(f"--seeds {text!r}: {part.strip()!r} is not a whole number; "
                             f"give comma-separated seeds such as 0,1,2") from None
    if any(v < 0 for v in values) or len(set(values)) != len(values):
        raise InputError(f"--seeds {text!r}: seeds must be distinct whole numbers >= 0, such as 0,1,2")
    return values


def tasks(text: str, flag: str = "--tasks") -> list[str]:
    from lrdist.data import parse_tasks
    try:
        return parse_tasks(text)
    except ValueError as exc:
        raise InputError(f"{flag} {text!r}: {exc}") from None


def pairs(text: str) -> list[list[str]]:
    """--pairs: task sequences separated by ';'."""
    return [tasks(seq, "--pairs") for seq in text.split(";")]


def heartbeat(interval: int, grace: int) -> None:
    if grace <= interval:
        raise InputError(f"--grace-period {grace} must be longer than --heartbeat-interval {interval}, or "
                         f"live trials would be taken for dead; use e.g. --grace-period {3 * interval}")


def recipe_fits(recipe, config: dict) -> None:
    """--max-length within the model's position embeddings (beyond them the embedding lookup fails)."""
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if limit and recipe.max_length > limit:
        raise InputError(f"--max-length {recipe.max_length} is longer than the model's {limit} positions; "
                         f"use --max-length {limit} or less")


def distribution(spec: str, kind: str = "absolute", flag: str = "--lrs", num_regions: int | None = None) -> None:
    """A distribution parses, holds positive finite values and, when known, one per region."""
    from lrdist.methods import load_distribution
    _, values = load_distribution(spec, kind)
    bad = [i for i, v in enumerate(values) if v is not None and not (math.isfinite(v) and v > 0)]
    if bad:
        raise InputError(f"{flag} {spec}: learning rates must be positive finite numbers; bad at position(s) {bad}")
    if all(v is None for v in values):  # null marks a region empty in the model a distribution came from
        raise InputError(f"{flag} {spec} has no learning rate for any region")
    if num_regions is not None and len(values) != num_regions:
        raise InputError(f"{flag} {spec} has {len(values)} values, but the region scheme has {num_regions} regions; "
                         f"give one per region")


def region_count(scheme_name: str, config: dict) -> int | None:
    """How many regions a scheme makes of this model (None if its config does not say its depth)."""
    from lrdist.regions import _layer_groups
    layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("n_layers")
    if layers is None and scheme_name == "layers":
        return None
    return _layer_groups(scheme_name, layers or 0) + 2  # + embeddings + head


def device(name: str | None) -> None:
    if name is None:
        return
    import torch
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")


# ---- files and folders ------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def writable_folder(path, flag: str = "--output") -> None:
    """``path`` is a folder we may write into, or can be created (its nearest existing parent is writable)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file, not a folder; choose a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise InputError(f"{flag} {path}: {base} is a file, so the folder cannot be made; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {base} is not writable; choose a folder you can write to")


def writable_file(path, flag: str = "--output") -> None:
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file name such as {path / 'combined.json'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path} is not writable; choose a file you can write")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise InputError(f"{flag} {path}: {base} is a file, so the file cannot be made; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {base} is not writable; choose a folder you can write to")


def json_file(path, flag: str):
    """A readable JSON file's contents (a missing or damaged one: one line naming it)."""
    from lrdist.files import read_json
    return read_json(path, flag)


def finetune_output(output, resume: bool) -> None:
    """No unfinished run is silently restarted; --resume has something to resume."""
    out = Path(output)
    ckpt, results = out / "checkpoint.pt", out / "results.json"
    if ckpt.exists() and not results.exists() and not resume:
        raise InputError(f"--output {out} holds an unfinished run (checkpoint.pt); add --resume to continue it, "
                         f"or choose another --output")
    if resume and results.exists() and not ckpt.exists():
        raise InputError(f"--output {out} holds a finished run and no checkpoint to resume; drop --resume to "
                         f"train again, or choose another --output")


# ---- models and data --------------------------------------------------------------------------------
WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
             "sentencepiece.bpe.model", "tokenizer.model")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def model(name: str, tokenizer: bool = True, flag: str = "--model") -> dict:
    """The model's config (a dict) from a local folder or the local Hugging Face cache; never downloads.

    Online and not cached, only asks the hub whether the model exists."""
    path = Path(name).expanduser()
    if path.exists() or _looks_like_path(name):
        if not path.is_dir():
            raise InputError(f"{flag} {name}: no such model folder; give a folder saved with save_pretrained "
                             f"or a hub id")
        missing = [what for what, patterns in (("config.json", ("config.json",)), ("weights", WEIGHTS),
                                               ("tokenizer files", TOKENIZER if tokenizer else ("*",)))
                   if not any(next(path.glob(p), None) for p in patterns)]
        if missing:
            raise InputError(f"{flag} {name}: the folder holds no {', no '.join(missing)}; give a folder saved "
                             f"with save_pretrained (model and tokenizer)")
        return _read_config(path / "config.json", name, flag)
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError
    try:
        cached = huggingface_hub.try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        raise InputError(f"{flag} {name!r} is neither a local folder nor a valid hub id (org/name)") from None
    if isinstance(cached, str):
        return _read_config(Path(cached), name, flag)
    if huggingface_hub.constants.is_offline_mode():
        raise InputError(f"{flag} {name}: not a local folder and not in the Hugging Face cache, and the hub is "
                         f"offline (HF_HUB_OFFLINE); give a local model folder, or go online to download it")
    try:
        found = huggingface_hub.file_exists(name, "config.json")
    except Exception as exc:  # no network, no permission: say so in one line
        raise InputError(f"{flag} {name}: cannot reach the Hugging Face hub ({type(exc).__name__}); give a "
                         f"local model folder or check the connection") from None
    if not found:
        raise InputError(f"{flag} {name}: no such model on the Hugging Face hub; check the id")
    return {}


def _read_config(path: Path, name: str, flag: str) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{flag} {name}: cannot read its config.json ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(f"{flag} {name}: its config.json holds no settings object; is it a model folder?")
    return config


def scheme(name: str) -> None:
    from lrdist.regions import _layer_groups
    try:
        _layer_groups(name, 12)
    except ValueError as exc:
        raise InputError(f"--scheme: {exc}") from None


def glue(task_names: list[str], data_dir) -> None:
    """Each task's train and evaluation splits exist in a local GLUE folder (the hub is not checked)."""
    from lrdist.data import resolve_data_dir, split_file, task_spec
    try:
        local = resolve_data_dir(data_dir)
        if local is not None:
            for t in task_names:
                split_file(local, t, "train")
                split_file(local, t, task_spec(t).eval_split)
    except FileNotFoundError as exc:
        raise InputError(f"--data-dir: {exc}") from None


# ---- studies ----------------------------------------------------------------------------------------
def storage(url: str, must_exist: bool, flag: str = "--storage") -> None:
    """A storage URL that parses; a SQLite or journal file that must exist does, and SQLite is intact."""
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        path = Path(url.split(":", 1)[1] if url.startswith("journal:") else url).expanduser()
        if must_exist and not path.is_file():
            raise InputError(f"{flag} {url}: no journal file {path}")
        if not must_exist:
            writable_file(path, flag)
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InputError(f"{flag} {url!r} is not a storage URL; use sqlite:///PATH, postgresql://..., "
                         f"or journal:PATH") from None
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return
    path = Path(parsed.database).expanduser()
    if path.is_file():
        sqlite_intact(path)
    elif must_exist:
        raise InputError(f"{flag} {url}: no database file {path}; check the path")
    else:
        writable_file(path, flag)


def sqlite_intact(path: Path) -> None:
    """Runs SQLite's own consistency check. The file is opened read-write (never created) so that a write
    left unfinished by a killed process (a hot journal) is rolled back, as the next writer would do;
    a read-only connection cannot, and would fail on a database that is in fact intact."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=60)
        try:
            verdict = con.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError as exc:
        if "readonly" in str(exc):
            raise InputError(f"the study database {path} holds a write left unfinished by a stopped process, "
                             f"which needs write access to roll back; make it and its folder writable") from None
        if "locked" in str(exc):
            raise InputError(f"the study database {path} stayed locked by another process for 60 s; "
                             f"try again when it is idle") from None
        verdict = str(exc)
    except sqlite3.DatabaseError as exc:
        verdict = str(exc)
    if verdict != "ok":
        detail = next((ln for ln in verdict.splitlines() if not ln.startswith("***")), verdict)
        raise InputError(f"the study database {path} is damaged ({detail}); "
                         f"restore it from a copy or start a new study with another --output")


def search_info(folder: Path) -> dict:
    """A search folder's search.json, its fields checked (lrdist.file_checks)."""
    from lrdist.file_checks import search_info as check
    from lrdist.files import read_json
    info = read_json(folder / "search.json", fix="fix or remove it")
    check(info, folder / "search.json")
    return info


def search_output(output, storage_url: str, study_name: str, task_names: list[str]) -> None:
    """The folder is new, or holds this same study (then the search resumes)."""
    folder = Path(output)
    writable_folder(folder)
    if (folder / "search.json").exists():
        info = search_info(folder)
        if info.get("study_name") != study_name:
            raise InputError(f"--output {folder} already holds the study {info.get('study_name')!r} (tasks "
                             f"{','.join(info.get('tasks', []))}); choose another --output for this one")
        from lrdist.search import OWN_DB, own_storage_url
        if info.get("storage") not in (storage_url, OWN_DB if storage_url == own_storage_url(folder) else None):
            raise InputError(f"--output {folder} belongs to the study stored in {info.get('storage')}; pass "
                             f"--storage {info.get('storage')} to continue it, or choose another --output")
    storage(storage_url, must_exist=False)


def search_sources(sources: list[str]) -> None:
    """Each source is an `lrdist search` folder or an existing storage; nothing is created."""
    for source in sources:
        path = Path(source)
        if path.is_dir():
            if not (path / "search.json").is_file():
                raise InputError(f"{path} holds no search.json: not an `lrdist search` output folder")
            from lrdist.search import folder_storage
            info = search_info(path)  # (its fields checked: a storage among them)
            url = folder_storage(path, info)
            if url is None:  # the folder's own database is gone: its trial files must hold the study
                if not any((path / "trials").glob("trial-*.json")):
                    raise InputError(f"{path} holds neither its study.db nor trial files (trials/trial-*.json)")
                continue
            storage(url, must_exist=True, flag=f"{path / 'search.json'} names")
        elif "://" in source or source.startswith("journal:") or source.endswith((".log", ".journal")):
            storage(source, must_exist=True, flag="source")
        else:
            raise InputError(f"{source} is neither a search folder nor a storage URL")


def names(text: str, allowed, flag: str, empty_ok: bool = False) -> list[str]:
    """A comma-separated list whose every item is one of ``allowed``."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not (items or empty_ok):
        raise InputError(f"{flag} {text!r}: {'unknown ' + ', '.join(map(repr, bad)) if bad else 'empty'}; "
                         f"choose from {', '.join(allowed)}")
    return items
