"""Sweep mechanics: run ids, the atomic results store (concurrent writers, SIGKILL), shards."""
from __future__ import annotations

import csv
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from studies.config import RunSpec
from studies.store import RESULT_COLUMNS
from studies.schema import ResultRow
from studies.store import ResultsStore
from studies.sweep import shard


def _spec(**kw) -> RunSpec:
    base = dict(task="gpt", optimizer="adamw", precision="fp32", lr=1e-3, seed=0, size="quick", steps=10)
    base.update(kw)
    return RunSpec(**base)


def _row(run_id: str, i: int = 0, pad: int = 0) -> dict:
    r = ResultRow(run_id, "main", "gpt", "adamw", "fp32", 1e-3, i).to_dict()  # a valid row (the store checks)
    r.update(run_id=run_id, phase="main", task="gpt", optimizer="adamw", precision="fp32", lr=1e-3, seed=i,
             final_loss=1.5 + i, diverged=False, status="ok", config_json='{"a": "' + "x" * pad + '", "b": [1, 2]}')
    return r


def test_run_id_is_a_hash_of_the_full_configuration():
    a = _spec()
    assert a.run_id == _spec().run_id and len(a.run_id) == 12
    # every field changes the id; the phase changes the id but not the reuse key
    for change in (dict(seed=1), dict(lr=2e-3), dict(precision="bf16"), dict(steps=11), dict(size="default"),
                   dict(thresholds={**a.thresholds, "spike_factor": 4.0}), dict(optimizer="sgd")):
        assert _spec(**change).run_id != a.run_id, change
    b = _spec(phase="tune")
    assert b.run_id != a.run_id and b.reuse_key == a.reuse_key
    assert RunSpec.from_json(a.config_json) == a


def test_store_append_replaces_same_run_id_and_keeps_order(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_row("a", 0))
    store.append(_row("b", 1))
    store.append({**_row("a", 0), "final_loss": 9.0})
    rows = store.rows()
    assert [r["run_id"] for r in rows] == ["b", "a"]
    assert float(rows[1]["final_loss"]) == 9.0
    assert list(rows[0]) == RESULT_COLUMNS
    # failed runs are not "completed" (they are retried)
    store.append({**_row("c", 2), "status": "error"})
    assert set(store.completed()) == {"a", "b"}


def _writer(out_dir: str, who: int, n: int) -> None:
    store = ResultsStore(out_dir)
    for i in range(n):
        store.append(_row(f"w{who}-{i}", i, pad=200))


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ids = [r["run_id"] for r in ResultsStore(tmp_path).rows()]
    assert sorted(ids) == sorted(f"w{w}-{i}" for w in range(4) for i in range(15))


def test_sigkill_during_appends_never_leaves_a_half_row_or_loses_an_acknowledged_one(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_sweep import _row
        from studies.store import ResultsStore
        store = ResultsStore({str(tmp_path)!r})
        i = 0
        while True:
            store.append(_row(f"r{{i}}", i, pad=20000))
            print(i, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    acked = -1
    t0 = time.time()
    while acked < 25 and time.time() - t0 < 60:
        line = proc.stdout.readline()
        if not line:
            break
        acked = int(line)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert acked >= 25, "writer made no progress"
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert header == RESULT_COLUMNS
    assert all(len(r) == len(header) for r in body)
    ids = [r[0] for r in body]
    assert len(ids) == len(set(ids))
    n = len(ids)
    assert n >= acked + 1                 # every acknowledged row is there ...
    assert n <= acked + 2                 # at most the one row being written when killed
    assert ids == [f"r{i}" for i in range(n)]   # complete and in order


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_partition_the_run_list(n):
    specs = [_spec(seed=s, lr=lr) for s in range(5) for lr in (1e-3, 3e-3, 1e-2)]
    parts = [shard(specs, k, n) for k in range(n)]
    ids = [s.run_id for p in parts for s in p]
    assert sorted(ids) == sorted(s.run_id for s in specs)          # union = all, no duplicates
    assert all(abs(len(p) - len(specs) / n) < 1 for p in parts)     # balanced
    # deterministic and independent of the input order
    assert [s.run_id for s in shard(list(reversed(specs)), 0, n)] == [s.run_id for s in parts[0]]
