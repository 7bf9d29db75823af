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
