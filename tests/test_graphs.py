"""The step does no host sync, so it can be captured in a CUDA graph and replayed with new LRs."""
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lrdist import FusedRegionAdamW

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}
OURS = tuple(os.path.join(*f) for f in [("lrdist", "optim.py"), ("lrdist", "step_plan.py"), ("lrdist", "fused_terms.py"),
                                        ("lrdist", "shards.py"), ("kernels", "fused_region_adamw.py")])


def device_storages(opt) -> set:
    """Storages of everything the step keeps on the device: params, grads, state, and the tables."""
    tensors = [p for g in opt.param_groups for p in g["params"]]
    tensors += [p.grad for p in tensors if p.grad is not None]
    tensors += [v for st in opt.state.values() for v in st.values()]
    tensors += list(opt._scales.values()) + [t for _, t in opt._hyper.values()]
    tensors += [getattr(ex, f) for ex in opt._extras.values() for f in ("ewc_lambda", "max_grad_norm", "norm_acc",
                                                                         "norm_out", "step_arrivals")]
    tensors += [t for table in opt._tables.values() for t in (table.ptrs, table.meta, table.block_tensor, table.arrivals)]
    tensors += [t for pair in opt._ewc.values() for t in pair] + list(opt._row_masks.values())
    tensors += [g["lr"] for g in opt.param_groups if isinstance(g["lr"], torch.Tensor)]
    return {t.untyped_storage().data_ptr() for t in tensors}


class HostReads(TorchFunctionMode):
    """Records reads into Python of device-resident tensors made by our own code (a CUDA host sync)."""

    def __init__(self, opt):
        super().__init__()
        self.opt, self.calls = opt, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS and args and isinstance(args[0], torch.Tensor):
            frame, caller = sys._getframe(1), None
            while frame is not None:  # inside our step? (reads by Triton's interpreter do not count)
                name = frame.f_code.co_filename
                if "triton" + os.sep in name:
                    break
                if caller is None and "torch" + os.sep not in name:
                    caller = frame.f_code.co_name
                if name.endswith(OURS):
                    if args[0].untyped_storage().data_ptr() in device_storages(self.opt):
                        self.calls.append((func.__name__, caller))
                    break
                frame = frame.f_back
        return func(*args, **(kwargs or {}))


def make(device, **kw):
    torch.manual_seed(0)
    ps = [torch.randn(s, device=device, requires_grad=True) for s in [(5, 3), (7,), (130,)]]
    groups = [{"params": [p], "region": i, "lr": torch.tensor(1e-3, dtype=torch.float64, device=device)}
              for i, p in enumerate(ps)]
    return ps, FusedRegionAdamW(groups, region_scales=[1.0, 0.5, 2.0], backend="triton", block_size=64, **kw)


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "clip+ewc+migu"])
def test_step_reads_nothing_back_to_the_host(device, extras):
    ps, opt = make(device, max_grad_norm=1.0 if extras else None)
    if extras:
        opt.set_ewc({ps[0]: torch.rand_like(ps[0])}, {ps[0]: torch.zeros_like(ps[0])}, 0.1)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # warm-up: tables built
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for _ in range(3):
        with HostReads(opt) as mode:
            if extras:
                opt.set_row_masks({ps[0]: (torch.arange(5, device=device) % 2).float()})
            opt.step()
            sched.step()
            opt.set_region_scales([1.0, 0.25, 3.0])  # host values: copied up, never read back
        assert mode.calls == [], mode.calls


def test_the_host_read_detector_catches_one(device, monkeypatch):
    ps, opt = make(device)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # warm-up: groups checked (a Tensor lr on the CPU is read then: no device sync there)
    real = opt._hyper_table
    monkeypatch.setattr(opt, "_hyper_table", lambda d: (opt.region_scales[0].item(), real(d))[1])  # a sync
    with HostReads(opt) as mode:
        opt.step()
    assert [c[0] for c in mode.calls] == ["item"]


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU (compiled Triton)")
def test_whole_step_cuda_graph_replays_with_new_lrs_and_distribution():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4)).cuda()
    ref = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4)).cuda()
    ref.load_state_dict(model.state_dict())

    def opt_for(m):
        groups = [{"params": list(layer.parameters()), "region": r, "lr": torch.tensor(1e-3, device="cuda")}
                  for r, layer in enumerate([m[0], m[2]])]
        return FusedRegionAdamW(groups, region_scales=[1.0, 1.0], max_grad_norm=1.0)
    opt, ref_opt = opt_for(model), opt_for(ref)
    x, y = torch.randn(32, 64, device="cuda"), torch.randint(0, 4, (32,), device="cuda")

    def step(m, o):
        o.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step(model, opt)
            step(ref, ref_opt)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, opt)
    for k in range(6):
        lr = 1e-3 * (0.5 ** k)
        for o in (opt, ref_opt):
            for g in o.param_groups:
                g["lr"].fill_(lr)  # what a scheduler does with Tensor lrs
        if k == 3:
            opt.set_region_scales([0.2, 3.0])
            ref_opt.set_region_scales([0.2, 3.0])
        graph.replay()
        step(ref, ref_opt)
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
