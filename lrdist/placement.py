"""Which device each search worker runs on: ``--devices 0,1,...`` (default: every visible CUDA device,
else the CPU), dealt round-robin, so N workers on N GPUs get one each and more workers share them."""
from __future__ import annotations


def visible_devices() -> list[str]:
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def parse_devices(spec: str | None) -> list[str] | None:
    """``"0,1"`` -> ``["cuda:0", "cuda:1"]``; also ``cpu``, ``cuda`` and ``cuda:N``. None stays None."""
    if spec is None:
        return None
    devices = []
    for item in (s.strip() for s in spec.split(",")):
        if item.isdigit():
            devices.append(f"cuda:{int(item)}")
        elif item in ("cpu", "cuda") or (item.startswith("cuda:") and item[5:].isdigit()):
            devices.append("cuda:0" if item == "cuda" else item)
        else:
            raise ValueError(f"--devices: {item!r} is not a device; give CUDA indices such as 0,1 (or cpu, cuda:N)")
    return devices


def place_workers(workers: int, devices: list[str], visible: list[str]) -> list[str]:
    """The device of each worker (``devices[w % len(devices)]``), after checking that each is visible."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not devices:
        raise ValueError("--devices is empty; give CUDA indices such as 0,1 (or cpu)")
    missing = [d for d in devices if d != "cpu" and d not in visible]
    if missing:
        raise ValueError(f"device(s) {', '.join(missing)} not visible here (visible: {', '.join(visible)}); "
                         f"pick from those with --devices")
    return [devices[w % len(devices)] for w in range(workers)]
