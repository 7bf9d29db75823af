"""Reading a results folder for the report, through :mod:`studies.schema` only (the writer's own definition).

``results.csv`` rows are parsed with :func:`studies.schema.parse_row` one by one, so that one damaged row does not
hide the others: a row that does not follow the schema (e.g. a truncated last line) and a second row with a run id
already seen (e.g. a manual merge that copied a row twice) are left out and named as "FILE line N: why" in
:attr:`Loaded.problems`; a row is never rendered or counted twice. A header that is not the schema's makes the
whole file unreadable (ValueError naming the file). ``metrics.csv`` / ``telemetry.csv`` that cannot be read are
named the same way and left out.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from studies.schema import (EXTRA_RESULT_TYPES, RESULT_COLUMNS, RESULT_TYPES, ResultRow, parse_row, read_metrics,
                            read_study, read_telemetry, results_frame)

__all__ = ["Loaded", "read_result_rows", "load_results", "load_study", "load_metrics", "RUN_KEYS"]

# The results columns copied onto every metrics/telemetry row (the run's cell).
RUN_KEYS = ("run_id", "phase", "task", "optimizer", "precision", "seed", "diverged", "diverged_step")


@dataclass
class Loaded:
    """Rows that follow the schema (each run id once) and the named problems of the rows left out."""

    rows: list[ResultRow]
    problems: list[str] = field(default_factory=list)


def _row_key(cells: dict[str, str | None]) -> tuple:
    return tuple(sorted((k, v) for k, v in cells.items() if k is not None))


def read_result_rows(path: str | Path) -> Loaded:
    """The rows of the results.csv at `path`; damaged and duplicate rows are named in ``problems`` and left out
    (the first row of a run id is kept). The optional EXTRA_RESULT_TYPES columns (data-parallel runs) are accepted
    and not shown. FileNotFoundError when absent; ValueError naming the file when its header is not RESULT_COLUMNS
    (plus extras) or the file is not UTF-8 CSV text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results.csv in {path.parent} (expected {path}); run `precision-sweep run` "
                                f"first")
    try:
        return _read_rows(path)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path} is not a readable results.csv (UTF-8 CSV): {exc}") from None


def _read_rows(path: Path) -> Loaded:
    out = Loaded([])
    first: dict[str, tuple[int, tuple]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        unknown = [c for c in header if c not in RESULT_TYPES and c not in EXTRA_RESULT_TYPES]
        missing = [c for c in RESULT_COLUMNS if c not in header]
        if unknown or missing:
            raise ValueError(f"{path}: header does not match studies.schema.RESULT_COLUMNS; unknown: "
                             f"{unknown or 'none'}, missing: {missing or 'none'}")
        for cells in reader:
            where = f"{path} line {reader.line_num}"
            extra = cells.get(None)
            if extra:
                out.problems.append(f"{where}: {len(extra)} cell(s) more than the header (left out)")
                continue
            short = [c for c in header if cells.get(c) is None]
            if short:
                out.problems.append(f"{where}: {len(header) - len(short)} of {len(header)} cells, no "
                                    f"{', '.join(short)} (truncated; left out)")
                continue
            try:
                row = parse_row(cells, where)
                if not row.run_id:
                    raise ValueError(f"{where}: empty run_id")
                config = json.loads(row.config_json)
                if not isinstance(config, dict):
                    raise ValueError(f"{where}: config_json is not a JSON object")
            except (ValueError, json.JSONDecodeError) as exc:
                out.problems.append(f"{exc} (left out)")
                continue
            key = _row_key(cells)
            if row.run_id in first:
                line, seen = first[row.run_id]
                same = "repeats" if seen == key else "conflicts with"
                out.problems.append(f"{where}: run {row.run_id} {same} line {line} (left out; the run is counted "
                                    f"once, from line {line})")
                continue
            first[row.run_id] = (reader.line_num, key)
            out.rows.append(row)
    return out


def load_results(out_dir: Path | str) -> tuple[pd.DataFrame, list[str]]:
    """``DIR/results.csv`` as a typed frame (studies.schema dtypes) plus a column ``final`` (the final validation
    loss, or the final training loss of a run that never evaluated), and the named problems (see
    :func:`read_result_rows`)."""
    loaded = read_result_rows(Path(out_dir) / "results.csv")
    df = results_frame(loaded.rows)
    df["final"] = df["final_val_loss"].where(df["final_val_loss"].notna(), df["final_loss"])
    return df, loaded.problems


def load_study(out_dir: Path | str) -> dict:
    """``DIR/study.json`` as a dict ({} when absent); see :func:`studies.schema.read_study`."""
    return read_study(out_dir)


def load_metrics(out_dir: Path | str, results: pd.DataFrame, name: str = "metrics.csv",
                 problems: list[str] | None = None) -> pd.DataFrame:
    """``DIR/runs/<run_id>/<name>`` (metrics.csv or telemetry.csv) of the runs in `results`, concatenated and tagged
    with RUN_KEYS. Runs without the file are skipped; a file that cannot be read is named in `problems` and
    skipped. An empty frame comes back when no run has one."""
    reader = read_telemetry if name == "telemetry.csv" else read_metrics
    frames = []
    runs_dir = Path(out_dir) / "runs"
    if not runs_dir.is_dir():
        return pd.DataFrame()
    for row in results[list(RUN_KEYS)].itertuples(index=False):
        p = runs_dir / str(row.run_id) / name
        if not p.is_file():
            continue
        try:
            m = reader(p)
        except ValueError as exc:
            if problems is not None:
                problems.append(f"{exc} (left out)")
            continue
        if m.empty:
            continue
        m = m.copy()
        for k, v in zip(RUN_KEYS, row):
            m[k] = v
        frames.append(m)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)
