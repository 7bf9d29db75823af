import pytest
import torch

from lowprec.hardware import probe


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """Skip unless torch._scaled_mm runs on CPU; else count its calls (the list grows by one per call)."""
    caps = probe()
    if not caps["scaled_mm_cpu"][0]:
        pytest.skip(caps["scaled_mm_cpu"][1])
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture
def count_batched(monkeypatch):
    """``count_batched(name)``: wrap ``lowprec.optim.<name>`` (a batch function of ``lowprec.optim_batch`` that
    returns None where it does not batch) and return a dict whose ``"n"`` counts the calls that did batch."""
    import lowprec.optim

    def install(name: str) -> dict:
        calls = {"n": 0}
        orig = getattr(lowprec.optim, name)

        def counted(*args, **kw):
            out = orig(*args, **kw)
            calls["n"] += out is not None
            return out
        monkeypatch.setattr(lowprec.optim, name, counted)
        return calls
    return install
