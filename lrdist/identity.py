"""What a stored result was made from, so that it is reused only for the same experiment.

An identity is a plain JSON dict stored with every result (search and tuning studies, evaluate runs,
finetune outputs):

* ``model``: a hash of the model's content (config, weights and tokenizer files), not its path;
* ``tasks`` and ``data``: per task, a hash of the rows each split actually used (texts, labels, idx);
* ``recipe``: every training setting (the seed of the data order and heads among them);
* ``device`` (``cpu`` or ``cuda``) and ``precision``: the precision the run computed in (``--precision auto``
  resolved for the device: bf16 autocast on CUDA, fp32 on CPU);
* optional ``method`` (a distribution by its LR values, not its file name), ``seed`` and others a caller
  adds (a search's space and objective);
* ``versions``: lrdist, torch, transformers and the torch build (CPU or CUDA), and for bf16 on a CPU how
  its GEMMs ran (``cpu_bf16_gemm``, lrdist.precision). A difference there is only warned about (``warn``):
  a study is shared across machines whose packages differ slightly.

``first_difference(stored, current)`` names the first field that differs (``"model"``,
``"data.mrpc.train"``, ``"recipe.lr"``, ...), and ``check`` turns it into the one-line refusal that
every command gives before any work, with the way out: another ``--output``, or ``--force``, which moves
the old files aside (``move_aside``) and deletes nothing.

Identities stored before a field existed are read by one rule (``upgrade``): the missing field is derived
from what the file records, or refused when it cannot be. ``device``: ``cpu`` when the torch build was
CPU-only (``versions.build``); ``precision``: the recipe's when not ``auto``, else ``auto`` resolved for the
device; ``versions.cpu_bf16_gemm`` of a bf16 CPU run: ``onednn`` (the only way before it was recorded);
a flat method without ``lr``: the recipe's LR (what it ran with); EWC without
``ewc_fisher_batches`` and LoRA without ``lora_dropout``: the defaults (every batch; 0.0), which the CLI
could not change before they were recorded for LoRA, and which an EWC run of other Fisher batches made
before then cannot be told from; a search without ``sampler`` or ``pruner``: the current ones (they were
not recorded; they decide which trials run, not what a trial measures, so an older study may go on with
either; a study that records them refuses a change). Otherwise the field stays missing and a comparison
names it ("device: missing then, ...").
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

IGNORED = ("versions",)  # recorded, warned about, never refused
# JSON keys that hold where a file was saved or by which version, not what the model computes
PATH_KEYS = ("_name_or_path", "name_or_path", "tokenizer_file", "transformers_version")
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
               "sentencepiece.bpe.model", "tokenizer.model")


class IdentityMismatch(ValueError):
    """A stored result was made from something else: one line naming the field and the way out."""


# ---- fingerprints ---------------------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    """A file's sha256, cached by its stat so a model is read once per process (and once per machine,
    through the cache file, until it changes)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if key in _FILE_CACHE:
        return _FILE_CACHE[key]
    disk = _disk_cache()
    if key not in disk:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        prefix = f"{path.resolve()}|"  # one entry per file: its older versions go
        disk = {k: v for k, v in disk.items() if not k.startswith(prefix)}
        disk[key] = digest
        _save_disk_cache(disk)
    _FILE_CACHE[key] = disk[key]
    return disk[key]


_FILE_CACHE: dict[str, str] = {}


def _cache_path() -> Path:
    root = os.environ.get("LRDIST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lrdist")
    return Path(root) / "sha256.json"


def _disk_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or unreadable: hash again


def _save_disk_cache(cache: dict) -> None:
    from lrdist.files import write_json
    try:
        write_json(_cache_path(), cache, indent=None)
    except OSError:
        pass  # a read-only home: the cache only saves time


def _content_sha256(path: Path) -> str:
    """Settings files without their path keys; small files read whole each time; large ones (weights)
    through the stat-keyed cache."""
    if path.suffix == ".json" and path.stat().st_size < SMALL:
        return hashlib.sha256(_json_content(path)).hexdigest()
    if path.stat().st_size < SMALL:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return _file_sha256(path)


SMALL = 4 << 20  # bytes: below this a file is hashed each time (a stat-keyed cache could miss a quick rewrite)


def _json_content(path: Path) -> bytes:
    """A JSON file's settings without the keys that record where it was saved (see PATH_KEYS)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return path.read_bytes()
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in PATH_KEYS}
    return json.dumps(data, sort_keys=True).encode()


def model_folder(model: str) -> Path:
    """The local folder holding ``model``: itself, or its snapshot in the Hugging Face cache (downloaded
    first when online and missing, as loading it would)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    import huggingface_hub
    patterns = list(MODEL_FILES) + ["*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                                    "pytorch_model.bin.index.json"]
    return Path(huggingface_hub.snapshot_download(model, allow_patterns=patterns))


def model_fingerprint(model: str) -> str:
    """sha256 of the model's config, weights and tokenizer files by content (their names and bytes; JSON
    files without the keys that record a path). The weights are what transformers loads: the safetensors
    files when there are any, else the PyTorch .bin files."""
    folder = model_folder(model)
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.safetensors.index.json"))
    if not weights:
        weights = sorted(folder.glob("pytorch_model*.bin")) + sorted(folder.glob("pytorch_model.bin.index.json"))
    if not (folder / "config.json").is_file() or not weights:
        raise ValueError(f"model {model}: {folder} holds no config.json and weights to fingerprint")
    h = hashlib.sha256()
    for path in [folder / n for n in MODEL_FILES if (folder / n).is_file()] + weights:
        h.update(f"{path.name} {_content_sha256(path)}\n".encode())
    return "sha256:" + h.hexdigest()


def rows_fingerprint(task: str, ds) -> str:
    """sha256 of the rows a split uses: each row's texts, label and idx, in order."""
    from lrdist.data import task_spec
    spec = task_spec(task)
    columns = [spec.text_a] + ([spec.text_b] if spec.text_b else []) + ["label"]
    columns += ["idx"] if "idx" in ds.column_names else []
    h = hashlib.sha256()
    for row in zip(*(list(ds[c]) for c in columns)):
        h.update(json.dumps(row).encode() + b"\n")
    return "sha256:" + h.hexdigest()


_DATA_CACHE: dict = {}


def splits(recipe) -> list[tuple[str, str, int | None]]:
    """(name in the identity, split, row cap) of what a run under ``recipe`` trains and scores on: the
    arguments SequentialRunner gives data.encode."""
    from lrdist.data import HELDOUT
    scored = "validation" if recipe.eval_on == "validation" else HELDOUT
    return [("train", "train", recipe.max_train_samples), (scored, scored, recipe.max_eval_samples)]


def data_fingerprint(tasks: list[str], recipe, data_dir=None) -> dict:
    """{task: {split: hash of its rows}} for the rows a run under ``recipe`` uses (data.select_rows)."""
    from lrdist.data import resolve_data_dir, select_rows, task_spec
    local = resolve_data_dir(data_dir)
    out = {}
    for task in tasks:
        out[task] = {}
        for name, split, cap in splits(recipe):
            if split == "validation":
                split = task_spec(task).eval_split
            source = "hub" if local is None else _stat_key(local / task)
            key = (task, split, cap, recipe.heldout_samples, source)
            if key not in _DATA_CACHE:
                rows = select_rows(task, split, cap, data_dir, heldout_samples=recipe.heldout_samples)
                _DATA_CACHE[key] = rows_fingerprint(task, rows)
            out[task][name] = _DATA_CACHE[key]
    return out


def _stat_key(folder: Path) -> tuple:
    """The parquet files of a task folder by path, size and modification time (a changed file: new key)."""
    return tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.parquet")))


def versions() -> dict:
    import torch
    import transformers

    from lrdist import __version__
    build = (f"cuda {torch.version.cuda}" if torch.version.cuda else
             f"rocm {torch.version.hip}" if getattr(torch.version, "hip", None) else "cpu")
    return {"lrdist": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "build": build}


def device_type(device) -> str:
    """``cpu`` or ``cuda`` for a device (None: the one a run picks, lrdist.continual.resolve_device), or
    ``cpu+cuda`` for a list of devices of both kinds (search workers)."""
    from lrdist.continual import resolve_device
    if isinstance(device, (list, tuple)):
        return "+".join(sorted({device_type(d) for d in device}))
    return resolve_device(None if device is None else str(device)).type


def effective_precision(precision: str, device: str) -> str:
    """What a run computes in: ``auto`` is bf16 autocast on CUDA, fp32 elsewhere (as SequentialRunner does)."""
    if precision != "auto":
        return precision
    return "bf16" if device == "cuda" else "fp32"


def method_settings(method, recipe) -> dict:
    """A method's settings as a run uses them: ``describe()``, with the recipe's LR where the method takes
    it (flat without an LR of its own runs at the recipe's: the same run as flat with that LR)."""
    described = method.describe()
    if described.get("method") == "flat" and described.get("lr") is None:
        described = {**described, "lr": recipe.lr}
    return described


def make(model: str, tasks: list[str], recipe, data_dir=None, device=None, **fields) -> dict:
    """The identity of results made from ``model`` on ``tasks`` under ``recipe`` on ``device`` (None: the
    one a run picks); ``fields`` adds what else they depend on (``method=...``, ``seed=...``, a search's
    ``space``). Plain JSON values."""
    from dataclasses import asdict
    kind = device_type(device)
    computed = effective_precision(recipe.precision, kind)
    how = versions()
    if computed == "bf16" and "cpu" in kind:  # how bf16 GEMMs ran: numbers differ at bf16 rounding, as across machines
        from lrdist.precision import cpu_bf16_gemm
        how["cpu_bf16_gemm"] = cpu_bf16_gemm()
    ident = {"model": model_fingerprint(model), "tasks": list(tasks),
             "data": data_fingerprint(tasks, recipe, data_dir), "recipe": asdict(recipe), "device": kind,
             "precision": computed, **fields, "versions": how}
    return json.loads(json.dumps(ident))  # as stored: tuples become lists


def upgrade(stored, current: dict | None = None):
    """A stored identity with the fields added since it was written filled in where they can be derived
    (see the module's docstring); ``current`` says which of a search's fields to fill. Anything else as is."""
    if not isinstance(stored, dict):
        return stored
    out = dict(stored)
    recipe = out.get("recipe") if isinstance(out.get("recipe"), dict) else {}
    build = (out.get("versions") or {}).get("build") if isinstance(out.get("versions"), dict) else None
    if "device" not in out and build == "cpu":
        out["device"] = "cpu"
    if "precision" not in out and recipe.get("precision") in ("fp32", "bf16"):
        out["precision"] = recipe["precision"]
    elif "precision" not in out and recipe.get("precision") == "auto" and out.get("device") in ("cpu", "cuda"):
        out["precision"] = effective_precision("auto", out["device"])
    versions_ = out.get("versions")
    if (isinstance(versions_, dict) and "cpu_bf16_gemm" not in versions_ and out.get("precision") == "bf16"
            and out.get("device") == "cpu"):  # recorded since lrdist.precision: every bf16 CPU run before ran oneDNN's
        out["versions"] = {**versions_, "cpu_bf16_gemm": "onednn"}
    method = out.get("method")
    if (isinstance(method, dict) and method.get("method") == "flat" and "knobs" not in method  # (a run, not a tuning study)
            and method.get("lr") is None and "lr" in recipe):
        out["method"] = {**method, "lr": recipe["lr"]}
    if isinstance(method, dict) and method.get("method") == "ewc" and "knobs" not in method:
        out["method"] = {"ewc_fisher_batches": None, **out["method"]}  # the default, all runs had then
    if isinstance(method, dict) and method.get("method") == "lora" and "knobs" not in method:
        out["method"] = {"lora_dropout": 0.0, **out["method"]}
    for key in ("sampler", "pruner"):  # a search's, before its identity held them
        if key not in out and isinstance(current, dict) and key in current and "space" in out:
            out[key] = current[key]
    return out


# ---- comparing ------------------------------------------------------------------------------------------
def first_difference(stored, current, prefix: str = "", ignore=IGNORED) -> str | None:
    """The dotted name of the first field (in ``current``'s order) whose value differs, or None."""
    if not (isinstance(stored, dict) and isinstance(current, dict)):
        return None if stored == current else (prefix or "identity")
    for key in list(current) + [k for k in stored if k not in current]:
        if not prefix and key in ignore:
            continue
        name = f"{prefix}.{key}" if prefix else key
        if key not in stored or key not in current:
            return name
        found = first_difference(stored[key], current[key], name, ())
        if found:
            return found
    return None


MISSING = object()


def field(ident, name: str, missing=None):
    """The value at a dotted name (``missing`` where it is missing)."""
    for part in name.split("."):
        ident = ident.get(part, missing) if isinstance(ident, dict) else missing
        if ident is missing:
            break
    return ident


def shown(value) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[7:19]
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def explain(stored, current, name: str) -> str:
    """'recipe.lr (0.0002 then, 0.0001 now)': a field that differs, its stored and current values."""
    if name == "identity" or not isinstance(stored, dict) or not stored:
        return "nothing recorded (made before identities were stored)"
    old, new = field(stored, name, MISSING), field(current, name, MISSING)
    what = {"model": "model (its weights, config or tokenizer files)"}.get(name, name)
    if name.startswith("data."):
        what = f"{name} (the rows used)"
    return f"{what}: {'missing' if old is MISSING else shown(old)} then, {'missing' if new is MISSING else shown(new)} now"


def check(stored, current: dict, what: str, way_out: str, ignore=IGNORED) -> str | None:
    """Refuse (IdentityMismatch, one line) when ``stored`` is not ``current``, comparing every field but
    those in ``ignore``. Returns the package-version difference to warn about (``version_note``), or None."""
    stored, current = upgrade(stored, current), upgrade(current, stored)  # (either may be an older file's)
    name = first_difference(stored, current, ignore=ignore) if isinstance(stored, dict) else "identity"
    if name is not None:
        raise IdentityMismatch(f"{what} was made from something else: {explain(stored, current, name)}; {way_out}")
    return version_note(stored, current)


def version_note(stored: dict, current: dict) -> str | None:
    """'torch 2.12.0 then, 2.13.0 now' for the package versions that differ, or None."""
    old, new = stored.get("versions") or {}, current.get("versions") or {}
    shown = lambda v: "missing" if v is None else v  # noqa: E731  (a field added since)
    diff = [f"{k} {shown(old.get(k))} then, {shown(new.get(k))} now" for k in dict.fromkeys([*new, *old])
            if old.get(k) != new.get(k)]
    return "; ".join(diff) or None


def warn(what: str, note: str | None) -> None:
    """The one warning line for results made with other package versions or bf16 GEMMs (reused all the same)."""
    if note:
        print(f"lrdist: warning: {what} was made with other software ({note}); its numbers may differ slightly",
              file=sys.stderr, flush=True)


def way_out(output) -> str:
    return f"use another --output, or --force to move the old files into {output}/replaced-<date>/"


def move_aside(output, paths) -> Path | None:
    """Move ``paths`` (inside ``output``) into ``output/replaced-YYYYmmdd-HHMMSS/``, keeping their places
    relative to ``output``; nothing is deleted. Returns that folder (None when nothing was there)."""
    output = Path(output)
    paths = [Path(p) for p in paths if Path(p).exists() or Path(p).is_symlink()]
    if not paths:
        return None
    root = output.resolve()
    for path in paths:  # every path checked before any moves: all or nothing
        inside = Path(os.path.realpath(path.parent)) / path.name  # (a link itself moves; one above it may not)
        if root not in inside.parents:
            raise ValueError(f"{path} lies outside {output} (through a symbolic link?): nothing was moved; "
                             f"move the old files away yourself")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = output / f"replaced-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = output / f"replaced-{stamp}-{n}"
    for path in paths:
        target = dest / (Path(os.path.realpath(path.parent)) / path.name).relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    print(f"lrdist: moved {len(paths)} old file(s) made from something else into {dest}", file=sys.stderr, flush=True)
    return dest
