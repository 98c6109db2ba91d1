import pytest
import torch
import transformers

from lrdist.methods import EWC, LLRD, MIGU, Distribution, make_method, PAPER_COMBINED


def tiny_bert(layers=2):
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(num_hidden_layers=layers, hidden_size=16,
                                                          num_attention_heads=2, intermediate_size=24,
                                                          vocab_size=50))


def test_ewc_gradient_equals_autograd_of_the_penalty():
    enc = tiny_bert()
    ewc = EWC(lam=37.0)
    ids = torch.randint(0, 50, (3, 7))

    def grad_batches(limit=None):
        for _ in range(3):
            enc.zero_grad()
            enc(input_ids=ids).last_hidden_state.pow(2).mean().backward()
            yield
    ewc.after_task(enc, grad_batches)
    with torch.no_grad():  # move away from theta*
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    # autograd of lambda * sum F (theta - theta*)^2, written from the formula
    enc.zero_grad()
    penalty = sum((ewc.fisher[n] * (p - ewc.theta_star[n]) ** 2).sum() for n, p in enc.named_parameters())
    (37.0 * penalty).backward()
    expected = {n: p.grad.clone() for n, p in enc.named_parameters()}
    for p in enc.parameters():
        p.grad = torch.zeros_like(p)
    ewc.after_backward(enc)
    for n, p in enc.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-12)
    assert any(f.abs().sum() > 0 for f in ewc.fisher.values())
    torch.testing.assert_close(ewc.penalty(enc), 37.0 * penalty.detach())


def test_ewc_pretrained_anchor_keeps_the_initial_weights():
    enc = tiny_bert()
    initial = {n: p.detach().clone() for n, p in enc.named_parameters()}
    ewc = EWC(anchor="pretrained")
    ewc.attach(None, enc)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    ewc.after_task(enc, lambda limit=None: iter(()))
    assert all(torch.equal(ewc.theta_star[n], initial[n]) for n in initial)


@pytest.mark.parametrize("threshold", [0.7, 0.5])
def test_migu_keeps_the_top_rows_by_output_magnitude_and_leaves_biases(threshold):
    enc = tiny_bert()
    migu = MIGU(threshold)
    migu.attach(None, enc)
    migu.before_task(1)
    enc.train()
    ids = torch.randint(0, 50, (4, 9))
    # record outputs independently, to compute the expected masks by hand
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, o.detach()))
             for m in enc.modules() if isinstance(m, torch.nn.Linear)]
    enc(input_ids=ids).last_hidden_state.sum().backward()
    for h in hooks:
        h.remove()
    outputs = {m: o for m, o in outputs.items() if m.weight.grad is not None}  # the pooler gets no grad here
    before = {m: (m.weight.grad.clone(), m.bias.grad.clone()) for m in outputs}
    migu.after_backward(enc)
    for m, out in outputs.items():
        mag = out.abs().sum(dim=(0, 1))
        keep = mag / mag.sum() >= torch.quantile(mag / mag.sum(), threshold)
        w_before, b_before = before[m]
        assert torch.equal(m.weight.grad[keep], w_before[keep])
        assert (m.weight.grad[~keep] == 0).all()
        assert torch.equal(m.bias.grad, b_before)  # biases untouched
        kept = keep.float().mean().item()
        assert abs(kept - (1 - threshold)) <= 1.0 / len(keep) + 1e-6
    migu.detach()
    assert not migu.handles


def test_migu_leaves_the_first_task_unmasked():
    enc = tiny_bert()
    migu = MIGU()
    migu.attach(None, enc)
    migu.before_task(0)
    enc(input_ids=torch.randint(0, 50, (2, 5))).last_hidden_state.sum().backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    migu.after_backward(enc)
    assert all(torch.equal(p.grad, grads[n]) for n, p in enc.named_parameters() if p.grad is not None)


def test_distributions_and_llrd(tmp_path):
    assert make_method("dist", lrs="paper").region_lrs(2e-5, 10) == PAPER_COMBINED
    assert make_method("dist", lrs="paper-rounded").region_lrs(2e-5, 10)[9] == pytest.approx(6e-5)
    f = tmp_path / "d.json"
    f.write_text('{"kind": "scale", "lrs": [1,1,1,1,1,1,1,1,1,2]}')
    assert make_method("dist", lrs=str(f)).region_lrs(1e-5, 10)[-1] == pytest.approx(2e-5)
    assert LLRD(0.5).region_lrs(1.0, 4) == [0.125, 0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="has 3 values but the region scheme has 10"):
        make_method("dist", lrs="1e-5,1e-5,1e-5").region_lrs(1e-5, 10)
    with pytest.raises(ValueError, match="positive finite"):
        Distribution([1e-5] * 9 + [-1.0]).region_lrs(1e-5, 10)
    with pytest.raises(ValueError, match="unknown method"):
        make_method("sgd")
    with pytest.raises(ValueError, match="needs --lrs"):
        make_method("dist")
    with pytest.raises(FileNotFoundError):
        make_method("dist", lrs=str(tmp_path / "missing.json"))
