"""studies.store writes results.csv through studies.schema: expected cell texts are written out by hand here
(the encoding of the schema docstring), and the file is read back with the csv module, not the store."""
from __future__ import annotations

import csv
import math

import pytest

from studies.schema import EXTRA_RESULT_TYPES, RESULT_COLUMNS, ResultRow, read_results_csv
from studies.store import ResultsStore


def _row(run_id: str, **kw) -> dict:
    r = ResultRow(run_id, "main", "gpt", "adamw", "fp32", 0.01, 3).to_dict()
    r.update(kw)
    return r


def _lines(path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_cells_follow_the_schema_encoding(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_row("a", steps=60, steps_done=60, tokens=15360, final_loss=2.969738483428955, diverged=False,
                      diverged_step=None, target_loss=math.nan, wall_s=0.1 + 0.2))
    header, (cells,) = _lines(tmp_path / "results.csv")
    assert header == list(RESULT_COLUMNS)
    assert cells["steps"] == "60" and cells["tokens"] == "15360"
    assert cells["final_loss"] == "2.969738483428955"           # repr: round-trips exactly
    assert cells["wall_s"] == "0.30000000000000004"
    assert cells["diverged"] == "False" and cells["diverged_step"] == "" and cells["target_loss"] == "nan"
    assert cells["lr"] == "0.01" and cells["seed"] == "3"


def test_update_accepts_text_cells_and_typed_values(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_row("a", diverged=True, diverged_step=7, status="diverged"))

    def fill(r: dict) -> dict:          # as studies.protocol does: text cells in, a few typed values set
        assert r["diverged_step"] == "7" and r["diverged"] == "True"
        return {**r, "target_loss": 3.25, "tokens_to_target": 1024.0}

    store.update(fill)
    _, (cells,) = _lines(tmp_path / "results.csv")
    assert (cells["target_loss"], cells["tokens_to_target"], cells["diverged_step"]) == ("3.25", "1024.0", "7")


def test_malformed_cell_is_refused_and_the_file_kept(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_row("a"))
    before = (tmp_path / "results.csv").read_bytes()
    with pytest.raises(ValueError, match="final_loss"):
        store.append(_row("b", final_loss="abc"))
    with pytest.raises(ValueError, match="unknown"):
        store.append(_row("c", no_such_column=1))
    assert (tmp_path / "results.csv").read_bytes() == before


def test_data_parallel_columns_follow_the_core_columns(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_row("single"))
    store.append(_row("ddp", world_size=2, comm="sign", comm_bytes_sent=10, comm_allreduce_bytes=400,
                      comm_ratio=0.025, replicas_identical=True))
    store.append({**store.rows()[0], "final_loss": 1.5})     # a rewrite of a row read back (empty extra cells)
    header, rows = _lines(tmp_path / "results.csv")
    assert header == [*RESULT_COLUMNS, *EXTRA_RESULT_TYPES]
    by_id = {r["run_id"]: r for r in rows}
    assert [by_id["single"][c] for c in EXTRA_RESULT_TYPES] == [""] * len(EXTRA_RESULT_TYPES)
    assert [by_id["ddp"][c] for c in EXTRA_RESULT_TYPES] == ["2", "sign", "10", "400", "0.025", "True"]
    assert by_id["single"]["final_loss"] == "1.5"
    assert [r.run_id for r in read_results_csv(tmp_path / "results.csv")] == ["ddp", "single"]
