"""Region schemes: which learning-rate region each parameter of a model belongs to.

A scheme splits a model into embeddings / groups of transformer layers / everything after (pooler,
task heads). The layers are found from the model's structure, not from names: the largest
``nn.ModuleList`` whose children share one class. Parameters registered before the first layer are the
embeddings; those after the last layer are the head. This covers BERT, RoBERTa, DistilBERT, ELECTRA,
GPT-2 and Llama-style decoders alike.

Schemes:
* ``"bert10"`` — Kenneweg et al. 2024: region 0 = embeddings, regions 1-8 = layer groups
  (12 layers: {0,1} {2} {3,4} {5} {6,7} {8} {9,10} {11}; layer l goes to 1 + floor(8 l / L), the paper's
  ceil(1.5 (i-1)) ... ceil(1.5 i) - 1 rule for any depth L), region 9 = everything else.
  Models with fewer than 8 layers leave some middle regions empty.
* ``"depth:N"`` — the same with N layer groups (N + 2 regions).
* ``"layers"`` — one region per layer (L + 2 regions).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

SCHEMES = ("bert10", "depth:N", "layers")


@dataclass(frozen=True)
class RegionMap:
    """Parameter name -> region, for one model and scheme."""

    scheme: str
    num_regions: int
    region_of: "OrderedDict[str, int]"
    labels: tuple  # a short description per region

    def names_in(self, region: int) -> list[str]:
        return [n for n, r in self.region_of.items() if r == region]

    @property
    def empty(self) -> tuple[int, ...]:
        """Regions holding no parameter (bert10 on a model with fewer than 8 layers has some)."""
        used = set(self.region_of.values())
        return tuple(r for r in range(self.num_regions) if r not in used)


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: the largest ModuleList of same-class children."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) != 1:
                continue
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of identical layers (nn.ModuleList); "
                         f"region schemes need one")
    return best


def _layer_groups(scheme: str, n_layers: int) -> int:
    if scheme == "bert10":
        return 8
    if scheme == "layers":
        return n_layers
    if scheme.startswith("depth:"):
        try:
            n = int(scheme.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"scheme {scheme!r}: 'depth:N' needs a positive integer N")
        return n
    raise ValueError(f"unknown region scheme {scheme!r}; choose from {', '.join(SCHEMES)}")


def assign_regions(model: nn.Module, scheme: str = "bert10") -> RegionMap:
    """Give every parameter of ``model`` exactly one region (checked)."""
    layers_name, layers = find_layers(model)
    n_layers = len(layers)
    n_groups = _layer_groups(scheme, n_layers)
    head = n_groups + 1
    prefix = layers_name + "."

    region_of: OrderedDict[str, int] = OrderedDict()
    seen_layers = False
    for name, _ in model.named_parameters():
        if name.startswith(prefix):
            layer = int(name[len(prefix):].split(".", 1)[0])
            region_of[name] = 1 + (layer * n_groups) // n_layers
            seen_layers = True
        else:
            region_of[name] = head if seen_layers else 0

    labels = ["embeddings"]
    for g in range(n_groups):
        members = [l for l in range(n_layers) if (l * n_groups) // n_layers == g]
        labels.append(f"layers {members[0]}-{members[-1]}" if len(members) > 1 else
                      f"layer {members[0]}" if members else "(no layers)")
    labels.append("head")
    assert len(region_of) == sum(1 for _ in model.parameters()), "a parameter was left unassigned"
    return RegionMap(scheme, n_groups + 2, region_of, tuple(labels))


def model_regions(model_id: str, scheme: str = "bert10") -> RegionMap:
    """The region map of a model with task heads, from its config alone (built on the meta device: no
    weights are read), e.g. to know which regions a search must leave out before any worker loads it."""
    import torch
    from transformers import AutoConfig, AutoModel
    config = AutoConfig.from_pretrained(model_id)
    with torch.device("meta"):
        encoder = AutoModel.from_config(config)
        model = nn.ModuleDict({"encoder": encoder, "heads": nn.Linear(1, 1)})  # heads follow the layers
    return assign_regions(model, scheme)


def param_groups(model: nn.Module, scheme: str = "bert10", weight_decay: float = 0.0,
                 no_decay: tuple[str, ...] = (), lr: float | None = None) -> list[dict]:
    """Param-group dicts carrying ``"region"``, ready for ``FusedRegionAdamW``.

    Parameters whose name contains any string of ``no_decay`` (e.g. ``("bias", "LayerNorm.weight")``)
    go to a twin group with ``weight_decay=0``. Empty regions produce no group.
    """
    rmap = assign_regions(model, scheme)
    params = dict(model.named_parameters())
    groups = []
    for region in range(rmap.num_regions):
        names = [n for n in rmap.names_in(region) if params[n].requires_grad]
        decay = [params[n] for n in names if not any(s in n for s in no_decay)]
        plain = [params[n] for n in names if any(s in n for s in no_decay)]
        for tensors, wd in ((decay, weight_decay), (plain, 0.0)):
            if tensors:
                group = {"params": tensors, "region": region, "weight_decay": wd}
                if lr is not None:
                    group["lr"] = lr
                groups.append(group)
    return groups


def region_table(model: nn.Module, scheme: str = "bert10") -> list[dict]:
    """One row per region: its label, the modules it holds, tensor and parameter counts."""
    rmap = assign_regions(model, scheme)
    params = dict(model.named_parameters())
    rows = []
    for region in range(rmap.num_regions):
        names = rmap.names_in(region)
        modules = list(OrderedDict.fromkeys(_module_of(n) for n in names))
        rows.append(dict(region=region, label=rmap.labels[region], modules=_summarise(modules),
                         tensors=len(names), params=sum(params[n].numel() for n in names)))
    return rows


def _module_of(name: str) -> str:
    parts = name.split(".")[:-1]
    # Collapse a layer's inner structure: "bert.encoder.layer.3.attention.self.query" -> "...layer.3"
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:3]) or name


def _summarise(modules: list[str], limit: int = 3) -> str:
    if len(modules) <= limit:
        return ", ".join(modules) or "-"
    return ", ".join(modules[:limit]) + f", ... (+{len(modules) - limit})"


def format_table(rows: list[dict]) -> str:
    head = f"{'region':>6}  {'label':<12} {'tensors':>7} {'params':>12}  modules"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['region']:>6}  {r['label']:<12} {r['tensors']:>7} {r['params']:>12,}  {r['modules']}")
    total = sum(r["params"] for r in rows)
    lines.append(f"{'':>6}  {'total':<12} {sum(r['tensors'] for r in rows):>7} {total:>12,}")
    return "\n".join(lines)

