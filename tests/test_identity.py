"""What a stored result was made from (lrdist/identity.py): content fingerprints, the first field that
differs, version warnings, and moving old files aside without deleting them."""
import hashlib
import json
import shutil
from dataclasses import replace

import pytest

from lrdist import identity
from lrdist.continual import Recipe, SequentialRunner
from lrdist.data import HELDOUT, select_rows
from lrdist.methods import Distribution, make_method

TINY = Recipe(epochs=1, batch_size=8, max_length=32, max_train_samples=16, max_eval_samples=16)


def test_the_model_is_known_by_its_content_not_its_path(minilm_path, other_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LRDIST_CACHE_DIR", str(tmp_path / "cache"))
    same = tmp_path / "copy-of-minilm"
    shutil.copytree(minilm_path, same)
    base = identity.model_fingerprint(str(minilm_path))
    assert identity.model_fingerprint(str(same)) == base  # another folder, the same files
    assert identity.model_fingerprint(str(other_model)) != base  # one weight of 11 million changed
    # the config counts, except the keys that only say where it was saved or by which version
    config = json.loads((same / "config.json").read_text())
    (same / "config.json").write_text(json.dumps({**config, "_name_or_path": "/elsewhere", "transformers_version": "0"}))
    assert identity.model_fingerprint(str(same)) == base
    (same / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.3}))
    assert identity.model_fingerprint(str(same)) != base
    (same / "config.json").write_text(json.dumps(config))
    assert identity.model_fingerprint(str(same)) == base
    # a weight file rewritten in place with one byte changed (same size) is another model: the cache is keyed
    # by the file's stat, and the rewrite changes its modification time
    weights = same / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert identity.model_fingerprint(str(same)) != base
    assert hashlib.sha256(bytes(data)).hexdigest() in (tmp_path / "cache" / "sha256.json").read_text()


def test_the_data_is_known_by_the_rows_used(minilm_path, glue_dir, other_glue):
    """The fingerprinted rows are the rows a run trains and scores on, and a changed label changes only
    that split's hash."""
    runner = SequentialRunner(minilm_path, "rte,mrpc", TINY, data_dir=glue_dir, progress=False)
    for task in ("rte", "mrpc"):
        assert list(select_rows(task, "train", 16, glue_dir)["idx"]) == runner.train[task].idx
        assert list(select_rows(task, "validation", 16, glue_dir)["idx"]) == runner.eval[task].idx
    base = identity.data_fingerprint(["rte", "mrpc"], TINY, glue_dir)
    changed = identity.data_fingerprint(["rte", "mrpc"], TINY, other_glue)
    assert identity.data_fingerprint(["rte", "mrpc"], TINY, other_glue) == changed  # stable
    assert base["rte"]["train"] == changed["rte"]["train"] and base["rte"]["validation"] != changed["rte"]["validation"]
    full = replace(TINY, max_eval_samples=None)  # every validation row
    a, b = identity.data_fingerprint(["rte"], full, glue_dir), identity.data_fingerprint(["rte"], full, other_glue)
    assert a["rte"]["train"] == b["rte"]["train"] and a["rte"]["validation"] != b["rte"]["validation"]
    assert base["mrpc"] == changed["mrpc"]
    # the held-out slice a search scores on is its own split in the identity
    heldout = identity.data_fingerprint(["rte"], replace(TINY, eval_on="heldout"), glue_dir)
    assert set(heldout["rte"]) == {"train", HELDOUT}
    rows = select_rows("rte", HELDOUT, 16, glue_dir, heldout_samples=TINY.heldout_samples)
    assert heldout["rte"][HELDOUT] == identity.rows_fingerprint("rte", rows)


def test_first_difference_names_the_field_and_ignores_versions():
    a = {"model": "sha256:aa", "data": {"rte": {"train": "x", "validation": "y"}}, "recipe": {"lr": 1e-4, "seed": 0},
         "method": {"method": "dist", "lrs": [1e-5, None]}, "seed": 0, "versions": {"torch": "2.13.0"}}
    assert identity.first_difference(a, json.loads(json.dumps(a))) is None
    for path, value, name in [(("model",), "sha256:bb", "model"), (("data", "rte", "validation"), "z", "data.rte.validation"),
                              (("recipe", "lr"), 2e-4, "recipe.lr"), (("method", "lrs"), [1e-5, 2e-5], "method.lrs"),
                              (("seed",), 1, "seed")]:
        b = json.loads(json.dumps(a))
        target = b
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert identity.first_difference(a, b) == name
    b = json.loads(json.dumps(a))
    b["versions"]["torch"] = "2.14.0"
    assert identity.first_difference(a, b) is None  # another torch: reused, with a warning
    assert identity.check(a, b, "x", "y") == "torch 2.13.0 then, 2.14.0 now"
    b["recipe"]["max_length"] = 64  # a field the stored identity lacks
    assert identity.first_difference(a, b) == "recipe.max_length"
    with pytest.raises(identity.IdentityMismatch) as info:
        identity.check(a, b, "the saved run r.json", identity.way_out("out"))
    assert str(info.value) == ("the saved run r.json was made from something else: recipe.max_length: missing then, 64 now; "
                               "use another --output, or --force to move the old files into out/replaced-<date>/")
    with pytest.raises(identity.IdentityMismatch, match="nothing recorded"):
        identity.check(None, a, "the saved run r.json", "way out")
    # a setting recorded as null (e.g. EWC's Fisher over every batch) is shown as null, not as missing
    c = {**a, "method": {"method": "ewc", "ewc_fisher_batches": None}}
    d = {**a, "method": {"method": "ewc", "ewc_fisher_batches": 4}}
    assert identity.explain(c, d, "method.ewc_fisher_batches") == "method.ewc_fisher_batches: null then, 4 now"
    assert identity.explain(d, c, "method.ewc_fisher_batches") == "method.ewc_fisher_batches: 4 then, null now"


def test_a_distribution_is_described_by_its_lrs_not_its_file(tmp_path):
    lrs = [1e-5] * 4 + [None] + [2e-5] * 5
    (tmp_path / "a.json").write_text(json.dumps({"kind": "absolute", "lrs": lrs}))
    (tmp_path / "b.json").write_text(json.dumps({"kind": "absolute", "lrs": lrs}))
    first = make_method("dist", lrs=str(tmp_path / "a.json")).describe()
    assert first == make_method("dist", lrs=str(tmp_path / "b.json")).describe() == Distribution(lrs).describe()
    (tmp_path / "a.json").write_text(json.dumps({"kind": "absolute", "lrs": lrs[:-1] + [3e-5]}))  # same path, new LRs
    assert make_method("dist", lrs=str(tmp_path / "a.json")).describe() != first


def test_move_aside_keeps_every_file(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r.json").write_text("old run")
    (tmp_path / "evaluate.json").write_text("old summary")
    dest = identity.move_aside(tmp_path, [tmp_path / "runs" / "r.json", tmp_path / "evaluate.json",
                                          tmp_path / "absent.json"])
    assert dest.parent == tmp_path and dest.name.startswith("replaced-")
    assert (dest / "runs" / "r.json").read_text() == "old run" and (dest / "evaluate.json").read_text() == "old summary"
    assert not (tmp_path / "runs" / "r.json").exists() and not (tmp_path / "evaluate.json").exists()
    (tmp_path / "evaluate.json").write_text("newer")
    again = identity.move_aside(tmp_path, [tmp_path / "evaluate.json"])  # the same second: its own folder
    assert again != dest and (again / "evaluate.json").read_text() == "newer" and (dest / "evaluate.json").exists()
    assert identity.move_aside(tmp_path, [tmp_path / "absent.json"]) is None


# every make_method keyword, a value other than its default, and the method(s) it belongs to
OTHER_VALUES = {"lrs": ("dist", "1e-5,2e-5,3e-5,4e-5,5e-5,6e-5,7e-5,8e-5,9e-5,1e-4"), "lrs_kind": ("dist", "scale"),
                "llrd_decay": ("llrd", 0.5), "ewc_lambda": ("ewc", 7.0), "ewc_anchor": ("ewc", "pretrained"),
                "ewc_fisher_batches": ("ewc", 3), "migu_threshold": ("migu", 0.2), "lora_rank": ("lora", 4),
                "lora_alpha": ("lora", 3.0), "lora_targets": ("lora", "query"), "lora_lr": ("lora", 1e-3)}


def test_every_setting_of_make_method_changes_what_a_method_describes():
    """A knob missing from describe() would let a saved run made with another value be reused: every
    keyword of make_method (found from its signature, so a new one cannot be forgotten) must show."""
    import inspect
    keywords = [k for k in inspect.signature(make_method).parameters if k != "name"]
    assert sorted(keywords) == sorted(OTHER_VALUES), "give the new make_method keyword a value in OTHER_VALUES"
    base = {"lrs": "1e-5,1e-5,1e-5,1e-5,1e-5,1e-5,1e-5,1e-5,1e-5,1e-5"}
    for key, (name, value) in OTHER_VALUES.items():
        default = make_method(name, **base).describe()
        changed = make_method(name, **{**base, key: value}).describe()
        assert changed != default, key
        assert json.loads(json.dumps(changed)) == changed  # plain JSON, as stored
    # a LoRA with per-region LRs on its adapters is another run than one without
    assert make_method("lora", lrs=base["lrs"]).describe() != make_method("lora").describe()


def test_flat_at_the_recipe_lr_is_the_same_run_as_untuned_flat():
    from lrdist.methods import Flat
    recipe = replace(TINY, lr=2e-4)
    assert identity.method_settings(Flat(), recipe) == identity.method_settings(Flat(2e-4), recipe) == \
        {"method": "flat", "lr": 2e-4}
    assert identity.method_settings(Flat(1e-4), recipe) != identity.method_settings(Flat(), recipe)


def test_identities_record_the_effective_precision_and_device(minilm_path, glue_dir):
    ident = identity.make(str(minilm_path), ["rte"], TINY, str(glue_dir), "cpu")
    assert (ident["device"], ident["precision"]) == ("cpu", "fp32")  # auto on a CPU
    assert identity.make(str(minilm_path), ["rte"], replace(TINY, precision="bf16"), str(glue_dir), "cpu")["precision"] == "bf16"
    assert identity.effective_precision("auto", "cuda") == "bf16"
    cuda = {**ident, "device": "cuda", "precision": "bf16"}  # a CUDA autocast run is not this CPU run
    with pytest.raises(identity.IdentityMismatch, match="device: \"cuda\" then, \"cpu\" now"):
        identity.check(cuda, ident, "the saved run r.json", "way out")


def old_format(ident: dict) -> dict:
    """An identity as the code before the device, precision, flat LR, EWC Fisher batches, sampler and pruner
    were recorded wrote it: the same dict without those fields."""
    old = {k: v for k, v in ident.items() if k not in ("device", "precision", "sampler", "pruner")}
    method = old.get("method")
    if isinstance(method, dict) and method.get("method") == "flat" and method.get("lr") == old["recipe"]["lr"]:
        old["method"] = {"method": "flat"}
    if isinstance(method, dict) and method.get("method") == "ewc":
        old["method"] = {k: v for k, v in method.items() if k != "ewc_fisher_batches"}
    return old


def test_identities_written_before_the_new_fields_are_still_accepted(minilm_path, glue_dir):
    """Files written by the earlier code (no device, precision, sampler, pruner; flat without its LR; EWC
    without its Fisher batches) are read by identity.upgrade: accepted when what they record says they match,
    refused (one line) on a genuine mismatch, or when the missing field cannot be derived."""
    from lrdist.methods import EWC, Flat
    bf16 = replace(TINY, precision="bf16")
    for recipe, method in ((bf16, Flat()), (TINY, Flat()), (bf16, EWC())):
        now = identity.make(str(minilm_path), ["rte"], recipe, str(glue_dir), "cpu",
                            method=identity.method_settings(method, recipe), seed=0)
        old = old_format(now)
        assert "device" not in old and "precision" not in old
        assert identity.check(old, now, "old", "way out") is None
        assert identity.check(now, old, "new", "way out") is None  # either side may be the older file's
    with pytest.raises(identity.IdentityMismatch, match=r"method.lr: 0.0002 then, 0.0001 now"):  # genuine
        identity.check(old_format(identity.make(str(minilm_path), ["rte"], TINY, str(glue_dir), "cpu",
                                                method=identity.method_settings(Flat(), TINY), seed=0)),
                       identity.make(str(minilm_path), ["rte"], TINY, str(glue_dir), "cpu",
                                     method=identity.method_settings(Flat(1e-4), TINY), seed=0), "old", "way out")
    now = identity.make(str(minilm_path), ["rte"], bf16, str(glue_dir), "cpu", seed=0)
    with pytest.raises(identity.IdentityMismatch, match=r"precision: \"fp32\" then, \"bf16\" now"):
        identity.check({**old_format(now), "recipe": {**now["recipe"], "precision": "fp32"}}, now, "old", "way out")
    cuda_build = {**old_format(now), "versions": {**now["versions"], "build": "cuda 12.8"}}
    with pytest.raises(identity.IdentityMismatch, match="device: missing then, \"cpu\" now"):  # cannot be derived
        identity.check(cuda_build, now, "old", "way out")
    search = {**now, "space": {"num_regions": 10}, "sampler": "tpe", "pruner": "hyperband"}
    assert identity.check(old_format(search), search, "old", "way out") is None  # not recorded then: any
    assert identity.check(old_format(search), {**search, "pruner": "median"}, "old", "way out") is None
    with pytest.raises(identity.IdentityMismatch, match="pruner: \"hyperband\" then, \"median\" now"):
        identity.check(search, {**search, "pruner": "median"}, "new", "way out")  # recorded: refused


def test_move_aside_checks_every_path_before_moving_any(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "runs").mkdir(parents=True)
    elsewhere.mkdir()
    (out / "runs" / "a.json").write_text("a")
    (elsewhere / "t.json").write_text("t")
    (out / "trials").symlink_to(elsewhere)  # trials/ links outside the output
    with pytest.raises(ValueError, match=r"t.json lies outside .*nothing was moved"):
        identity.move_aside(out, [out / "runs" / "a.json", out / "trials" / "t.json"])
    assert (out / "runs" / "a.json").read_text() == "a" and (elsewhere / "t.json").read_text() == "t"
    assert not [p for p in out.iterdir() if p.name.startswith("replaced-")]
    dest = identity.move_aside(out, [out / "runs" / "a.json", out / "trials"])  # the link itself moves
    assert (dest / "runs" / "a.json").read_text() == "a" and (dest / "trials").is_symlink()
    assert (elsewhere / "t.json").read_text() == "t"
