"""Delayed-scaling histories in state_dict (resume bit-identically) and the DDP amax reduction (2 gloo processes).

Oracles: an uninterrupted run (a resumed run must match it bit for bit; one resumed without the histories must
not), and for DDP the amaxes computed directly from each rank's data (max over ranks)."""
import copy
import io
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lowprec.nn import convert, reduce_amax

POLICY = "weight=e4m3:delayed8,activation=e4m3:delayed8:margin=1,grad=e5m2:delayed4"
KEYS = ("amax_history", "scale", "scale_inv", "steps")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return convert(nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4)), POLICY)


def _steps(model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> list[float]:
    losses = []
    for t in range(start, stop):
        g = torch.Generator().manual_seed(100 + t)
        x = torch.randn(16, 8, generator=g) * (1 + 3 * (t % 3))   # amaxes change from step to step
        y = torch.randn(16, 4, generator=g)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_state_dict_holds_histories_and_resume_is_bit_identical():
    ref = _model()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_losses = _steps(ref, opt, 0, 8)

    half = _model()
    opt_h = torch.optim.AdamW(half.parameters(), lr=1e-2)
    _steps(half, opt_h, 0, 4)
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt_h.state_dict()}, buf)
    sd = half.state_dict()
    for layer in ("0", "2"):
        for role, hist in (("weight", 8), ("activation", 8), ("grad", 4)):
            for k in KEYS:
                assert f"{layer}.lowprec_delayed.{role}.{k}" in sd
            assert sd[f"{layer}.lowprec_delayed.{role}.amax_history"].shape == (hist,)
            assert int(sd[f"{layer}.lowprec_delayed.{role}.steps"]) == 4
    # the activation history of layer 0 holds the inputs' amaxes, in step order (closed form)
    want = [float((torch.randn(16, 8, generator=torch.Generator().manual_seed(100 + t)) * (1 + 3 * (t % 3)))
                  .abs().max()) for t in range(4)]
    assert sd["0.lowprec_delayed.activation.amax_history"][:4].tolist() == pytest.approx(want, rel=0, abs=0)

    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = _model()
    opt_r = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    assert resumed.load_state_dict(ckpt["model"]) is not None
    opt_r.load_state_dict(ckpt["opt"])
    assert _steps(resumed, opt_r, 4, 8) == ref_losses[4:]
    for a, b in zip(resumed.parameters(), ref.parameters()):
        assert torch.equal(a, b)

    # without the histories (a checkpoint of the parameters only) the run differs: the test can fail
    fresh = _model()
    opt_f = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh.load_state_dict({k: v for k, v in ckpt["model"].items() if "lowprec_delayed" not in k})
    opt_f.load_state_dict(ckpt["opt"])
    assert _steps(fresh, opt_f, 4, 8) != ref_losses[4:]


def test_keys_only_for_delayed_specs_and_mismatch_errors():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    keys = list(plain.state_dict())
    assert list(convert(copy.deepcopy(plain), "fp8-all").state_dict()) == keys
    mixed = convert(copy.deepcopy(plain), "weight=e4m3:delayed8,activation=e4m3:tensor")
    assert sorted(k for k in mixed.state_dict() if "lowprec" in k) == sorted(
        f"{i}.lowprec_delayed.weight.{k}" for i in (0, 1) for k in KEYS)
    # a parameter-only checkpoint loads strictly into a delayed model; the reverse names the unexpected keys
    mixed.load_state_dict(plain.state_dict())
    with pytest.raises(RuntimeError, match="Unexpected key.*lowprec_delayed.weight.amax_history"):
        plain.load_state_dict(mixed.state_dict())
    # another history length is an error naming both lengths
    other = convert(copy.deepcopy(plain), "weight=e4m3:delayed16,activation=e4m3:tensor")
    with pytest.raises(RuntimeError, match="length 8.*keeps 16"):
        other.load_state_dict(mixed.state_dict())


def test_attention_site_histories_in_state_dict():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    q = convert(copy.deepcopy(layer), "activation=e4m3:delayed4,grad=e5m2:delayed4", attention=True)
    x = torch.randn(2, 5, 16)
    q(x).sum().backward()
    sd = q.state_dict()
    qk = "self_attn.lowprec_delayed.qk.activation.steps"
    assert qk in sd and int(sd[qk]) >= 1
    assert "self_attn.lowprec_delayed.pv.grad.amax_history" in sd
    q2 = convert(copy.deepcopy(layer), "activation=e4m3:delayed4,grad=e5m2:delayed4", attention=True)
    q2.load_state_dict(sd)
    assert q2.self_attn.attention.qk.scalers["activation"].steps == int(sd[qk])
    torch.testing.assert_close(q2(x), q(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- DDP (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for reduce in (True, False):
            torch.manual_seed(0)
            model = convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), POLICY)
            assert reduce_amax(model, None if not reduce else dist.group.WORLD) == 6
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
            data = torch.Generator().manual_seed(1000 + rank)   # each rank its own shard, its own range
            amaxes = []
            for _ in range(3):
                x = torch.randn(8, 8, generator=data) * (1 + 4 * rank)
                amaxes.append(float(x.abs().max()))
                opt.zero_grad()
                ddp(x).square().mean().backward()
                opt.step()
            results[reduce] = dict(
                amaxes=amaxes, params=[p.detach().clone() for p in model.parameters()],
                hist={f"{i}.{r}": (s.amax_history.clone(), s.steps) for i in (0, 2)
                      for r, s in model[i].site.scalers.items()})
            del ddp
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_amax_reduction_two_gloo_processes():
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        res = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    on0, on1 = res[0][True], res[1][True]
    for key, (h0, n0) in on0["hist"].items():
        h1, n1 = on1["hist"][key]
        assert n0 == n1 == 3 and torch.equal(h0, h1), key   # one history on every rank
    want = [max(a, b) for a, b in zip(on0["amaxes"], on1["amaxes"])]
    assert on0["hist"]["0.activation"][0][:3].tolist() == pytest.approx(want, rel=1e-7)
    for a, b in zip(on0["params"], on1["params"]):
        assert torch.equal(a, b)
    # without the reduction each rank records its own amaxes (rank 1's data is ~5x larger)
    off0, off1 = res[0][False], res[1][False]
    assert off0["hist"]["0.activation"][0][:3].tolist() == pytest.approx(off0["amaxes"], rel=1e-7)
    assert off1["hist"]["0.activation"][0][:3].tolist() == pytest.approx(off1["amaxes"], rel=1e-7)
    assert not torch.equal(off0["hist"]["0.grad"][0], off1["hist"]["0.grad"][0])


def test_reduce_amax_without_process_group_raises():
    model = _model()
    reduce_amax(model)
    with pytest.raises(RuntimeError, match="init_process_group"):
        model(torch.randn(2, 8))
    reduce_amax(model, None)
    model(torch.randn(2, 8))
