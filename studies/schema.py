"""The results schema of a precision-sweep folder: the one definition that the writer and the reader share.

A results folder holds::

    DIR/results.csv                  one row per finished run: RESULT_COLUMNS, typed by RESULT_TYPES, then the
                                     EXTRA_RESULT_TYPES columns some row has (data-parallel runs of studies.ddp)
    DIR/study.json                   the study definition: keys in STUDY_KEYS, strict JSON (NaN/inf written as null)
    DIR/runs/<run_id>/metrics.csv    per-step metrics: METRIC_COLUMNS (all numbers)
    DIR/runs/<run_id>/telemetry.csv  the lowprec Telemetry frame (TELEMETRY_STRING_COLUMNS are text, the rest numbers)

Text encoding of results.csv cells (:func:`format_cell` / :func:`parse_cell`, inverse of each other):
``bool`` is ``True``/``False``; ``float`` is ``repr`` (``nan`` for not-a-number, ``inf``/``-inf``); ``int`` is
decimal; an optional int (``int?``) is ``""`` for None; ``str`` is itself. An extra column's empty cell means
the row does not have it. Anything else is refused with a ValueError naming the column, the value and what is
valid. In a DataFrame (:func:`results_frame`) the types are
``bool``, ``float64``, ``int64``, ``object`` (str); optional ints become float64 with NaN for None.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from lowprec.policy import TENSOR_ROLES

__all__ = [
    "METRIC_ROLES", "METRIC_COLUMNS", "RESULT_COLUMNS", "RESULT_TYPES", "EXTRA_RESULT_TYPES", "STUDY_KEYS",
    "TELEMETRY_STRING_COLUMNS", "STATUSES", "ResultRow", "format_cell", "parse_cell", "format_row", "parse_row",
    "typed_row", "results_csv_text", "write_results_csv", "float_or_nan",
    "read_results_csv", "results_frame", "read_results", "write_metrics_csv", "read_metrics", "read_telemetry",
    "to_strict_json", "dumps_study", "write_study", "read_study",
]

# The roles whose quantization telemetry is logged per step: lowprec's one list of tensor roles (the accumulator
# is not one of them: it has no per-step telemetry column).
METRIC_ROLES = TENSOR_ROLES
METRIC_COLUMNS = (
    ("step", "tokens", "loss", "val_loss", "lr", "grad_norm", "update_ratio")
    + tuple(f"{r}_{k}" for r in METRIC_ROLES for k in ("underflow", "overflow"))
    + ("state_zero_frac", "lost_update_frac")
)
TELEMETRY_STRING_COLUMNS = ("site", "role", "format")

STATUSES = ("ok", "diverged", "error")


@dataclass
class ResultRow:
    """One run's row of results.csv.

    ``steps`` is None when the task default was used and not resolved; ``diverged_step`` is None unless the run
    diverged. Losses/tokens-to-target are NaN when absent (e.g. a run that never evaluated or never reached the
    target). ``status`` is one of STATUSES ("error": the run itself failed; not a divergence).
    """

    run_id: str
    phase: str
    task: str
    optimizer: str
    precision: str
    lr: float
    seed: int
    steps: int | None = None
    steps_done: int = 0
    tokens: int = 0
    final_loss: float = math.nan
    final_val_loss: float = math.nan
    best_val_loss: float = math.nan
    diverged: bool = False
    diverged_step: int | None = None
    divergence_reason: str = ""
    divergence_site: str = ""
    explanation: str = ""
    target_loss: float = math.nan
    tokens_to_target: float = math.nan
    wall_s: float = math.nan
    state_bytes_per_param: float = math.nan
    status: str = "ok"
    config_json: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The row as a dict in RESULT_COLUMNS order."""
        return asdict(self)


RESULT_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ResultRow))
RESULT_TYPES: dict[str, str] = {
    f.name: {"str": "str", "float": "float", "int": "int", "int | None": "int?", "bool": "bool"}[str(f.type)]
    for f in fields(ResultRow)
}

# Optional columns after RESULT_COLUMNS, in this order, present in results.csv when some row has them: a
# data-parallel run's (studies.ddp) processes, gradient communication and the check that its replicas agree.
EXTRA_RESULT_TYPES: dict[str, str] = {
    "world_size": "int", "comm": "str", "comm_bytes_sent": "int", "comm_allreduce_bytes": "int",
    "comm_ratio": "float", "replicas_identical": "bool",
}
_ALL_TYPES = {**RESULT_TYPES, **EXTRA_RESULT_TYPES}

# study.json top-level keys (written by studies.protocol); a reader gets {} for an absent file.
STUDY_KEYS = (
    "command", "date", "finished", "versions", "config", "thresholds", "shard", "tasks", "protocol", "status",
    "size", "optimal_loss", "targets", "counts", "lr_grid", "chosen_lrs", "lr_scores", "lr_tried", "lr_at_edge",
    "lr_extension_rule", "fingerprint", "horizons", "device",
)


# ------------------------------------------------------------------------------------------- results.csv cells
def _kind(column: str) -> str:
    try:
        return _ALL_TYPES[column]
    except KeyError:
        raise ValueError(f"unknown results column {column!r}; valid columns: {', '.join(_ALL_TYPES)}") from None


def format_cell(column: str, value: Any) -> str:
    """The text of `value` in results.csv column `column` (see the module docstring for the encoding)."""
    kind = _kind(column)
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"results column {column!r} holds booleans (True/False), got {value!r}")
        return "True" if value else "False"
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"results column {column!r} holds text, got {type(value).__name__} {value!r}")
        return value
    if kind in ("int", "int?"):
        if value is None and kind == "int?":
            return ""
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
                return str(int(value))
            what = "an integer or None" if kind == "int?" else "an integer"
            raise ValueError(f"results column {column!r} holds {what}, got {value!r}")
        return str(int(value))
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"results column {column!r} holds numbers, got {type(value).__name__} {value!r}")
    v = float(value)
    return "nan" if math.isnan(v) else repr(v)


def float_or_nan(value: Any) -> float:
    """``float(value)`` for a cell read back either typed or as text; nan when it is empty, None or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def parse_cell(column: str, text: str) -> Any:
    """The typed value of results.csv cell `text` in `column` (inverse of :func:`format_cell`)."""
    kind = _kind(column)
    if kind == "str":
        return text
    if kind == "bool":
        if text not in ("True", "False"):
            raise ValueError(f"results column {column!r}: {text!r} is not a boolean (valid: True, False)")
        return text == "True"
    if kind == "int?" and text == "":
        return None
    if kind in ("int", "int?"):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"results column {column!r}: {text!r} is not an integer"
                             + (" (or empty for none)" if kind == "int?" else "")) from None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"results column {column!r}: {text!r} is not a number (valid: a float, nan, inf)") from None


def format_row(row: ResultRow | Mapping[str, Any]) -> dict[str, str]:
    """A row (ResultRow or mapping with every RESULT_COLUMNS key and any EXTRA_RESULT_TYPES keys) as results.csv
    text cells, in column order."""
    d = row.to_dict() if isinstance(row, ResultRow) else dict(row)
    extra = [k for k in d if k not in _ALL_TYPES]
    missing = [c for c in RESULT_COLUMNS if c not in d]
    if extra or missing:
        raise ValueError(f"a results row must have exactly the columns of studies.schema.RESULT_COLUMNS; "
                         f"unknown: {extra or 'none'}, missing: {missing or 'none'}")
    if d["status"] not in STATUSES:
        raise ValueError(f"results column 'status': {d['status']!r} is not valid (valid: {', '.join(STATUSES)})")
    return {c: format_cell(c, d[c]) for c in _ALL_TYPES if c in d}


def typed_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row whose cells may be results.csv text (as read back) or typed values, with every text cell of a
    non-text column parsed (:func:`parse_cell`; a malformed one raises) and empty extra cells dropped."""
    out = {}
    for c, v in row.items():
        kind = _kind(c)
        if c in EXTRA_RESULT_TYPES and v == "":
            continue
        out[c] = parse_cell(c, v) if isinstance(v, str) and kind != "str" else v
    return out


def results_csv_text(rows: Iterable[ResultRow | Mapping[str, Any]]) -> str:
    """The text of results.csv holding `rows` (header: RESULT_COLUMNS, then the extra columns some row has)."""
    cells = [format_row(r) for r in rows]
    extras = [c for c in EXTRA_RESULT_TYPES if any(c in r for r in cells)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*RESULT_COLUMNS, *extras], restval="")
    w.writeheader()
    w.writerows(cells)
    return buf.getvalue()


def parse_row(cells: Mapping[str, str], where: str = "results row") -> ResultRow:
    """A ResultRow from results.csv text cells; errors name `where` (e.g. "results.csv line 3")."""
    missing = [c for c in RESULT_COLUMNS if c not in cells or cells[c] is None]
    if missing:
        raise ValueError(f"{where} lacks column(s) {', '.join(missing)} (truncated or not written by "
                         f"studies.schema); columns: {', '.join(RESULT_COLUMNS)}")
    try:
        row = ResultRow(**{c: parse_cell(c, cells[c]) for c in RESULT_COLUMNS})
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if row.status not in STATUSES:
        raise ValueError(f"{where}: status {row.status!r} is not valid (valid: {', '.join(STATUSES)})")
    return row


def write_results_csv(path: str | Path, rows: Iterable[ResultRow | Mapping[str, Any]]) -> None:
    """Write results.csv at `path` (:func:`results_csv_text`). Not atomic by itself: ``studies.store`` writes the
    same text to a temporary file and renames it."""
    Path(path).write_text(results_csv_text(rows), encoding="utf-8", newline="")


def read_results_csv(path: str | Path) -> list[ResultRow]:
    """The rows of results.csv at `path` (FileNotFoundError if absent; ValueError naming file and line if a row
    or the header does not follow the schema)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        unknown = [c for c in header if c not in _ALL_TYPES]
        missing = [c for c in RESULT_COLUMNS if c not in header]
        if unknown or missing:
            raise ValueError(f"{path}: header does not match studies.schema.RESULT_COLUMNS; unknown: "
                             f"{unknown or 'none'}, missing: {missing or 'none'}")
        return [parse_row(cells, f"{path} line {reader.line_num}") for cells in reader]


_FRAME_DTYPE = {"str": object, "float": "float64", "int": "int64", "int?": "float64", "bool": bool}


def results_frame(rows: Iterable[ResultRow]) -> pd.DataFrame:
    """Rows as a DataFrame with columns RESULT_COLUMNS and the dtypes of the module docstring."""
    records = [r.to_dict() for r in rows]
    df = pd.DataFrame.from_records(records, columns=list(RESULT_COLUMNS))
    for c in RESULT_COLUMNS:
        kind = RESULT_TYPES[c]
        if kind == "int?":
            df[c] = pd.Series([math.nan if v is None else float(v) for v in df[c]], index=df.index, dtype="float64")
        else:
            df[c] = df[c].astype(_FRAME_DTYPE[kind])
    return df


def read_results(out_dir: str | Path) -> pd.DataFrame:
    """``DIR/results.csv`` as a typed DataFrame (see :func:`read_results_csv`, :func:`results_frame`)."""
    path = Path(out_dir) / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no results.csv in {Path(out_dir)} (expected {path}); run `precision-sweep run` "
                                f"first")
    return results_frame(read_results_csv(path))


# ------------------------------------------------------------------------------------------- per-run files
def write_metrics_csv(path: str | Path, rows: Iterable[Mapping[str, float]]) -> None:
    """Write a run's metrics.csv (columns METRIC_COLUMNS; a missing value is written empty)."""
    rows = list(rows)
    for i, r in enumerate(rows):
        extra = [k for k in r if k not in METRIC_COLUMNS]
        if extra:
            raise ValueError(f"metrics row {i} has unknown column(s) {extra}; valid: {', '.join(METRIC_COLUMNS)}")
    df = pd.DataFrame.from_records(rows, columns=list(METRIC_COLUMNS))
    df.to_csv(path, index=False)


def read_metrics(path: str | Path) -> pd.DataFrame:
    """A run's metrics.csv as float64 columns METRIC_COLUMNS (empty cells are NaN); ValueError naming the file
    when a column is missing, unknown or not numeric."""
    path = Path(path)
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty (expected the header {', '.join(METRIC_COLUMNS)})") from None
    except pd.errors.ParserError as exc:
        raise ValueError(f"{path} is not a readable CSV: {exc}") from None
    unknown = [c for c in df.columns if c not in METRIC_COLUMNS]
    missing = [c for c in METRIC_COLUMNS if c not in df.columns]
    if unknown or missing:
        raise ValueError(f"{path}: columns do not match studies.schema.METRIC_COLUMNS; unknown: {unknown or 'none'}, "
                         f"missing: {missing or 'none'}")
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise ValueError(f"{path}: column(s) {', '.join(bad)} are not numeric")
    return df.astype("float64")


def read_telemetry(path: str | Path) -> pd.DataFrame:
    """A run's telemetry.csv (lowprec Telemetry frame): TELEMETRY_STRING_COLUMNS as text, others as numbers."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={c: str for c in TELEMETRY_STRING_COLUMNS}, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty (expected the lowprec Telemetry frame)") from None
    except pd.errors.ParserError as exc:
        raise ValueError(f"{path} is not a readable CSV: {exc}") from None
    if "site" not in df.columns:
        raise ValueError(f"{path} lacks the column 'site' (not a lowprec Telemetry frame)")
    for c in df.columns:
        if c == "sampled":
            df[c] = df[c].astype(str) == "True"
        elif c not in TELEMETRY_STRING_COLUMNS:
            df[c] = pd.to_numeric(df[c].replace("", math.nan))
    return df


# ------------------------------------------------------------------------------------------- study.json
def to_strict_json(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (JSON null), numpy scalars as Python numbers, tuples as
    lists and Paths as strings; other non-JSON types raise TypeError naming them."""
    if isinstance(obj, dict):
        return {str(k): to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict_json(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"study.json values must be JSON data (dict, list, str, number, bool, None), got "
                    f"{type(obj).__name__} {obj!r}")


def dumps_study(study: Mapping[str, Any]) -> str:
    """The text of study.json: strict JSON (no bare NaN), indented, keys in insertion order."""
    unknown = [k for k in study if k not in STUDY_KEYS]
    if unknown:
        raise ValueError(f"unknown study.json key(s) {unknown}; valid keys (studies.schema.STUDY_KEYS): "
                         f"{', '.join(STUDY_KEYS)}")
    return json.dumps(to_strict_json(dict(study)), indent=2, allow_nan=False) + "\n"


def write_study(path: str | Path, study: Mapping[str, Any]) -> None:
    """Write study.json at `path` (not atomic by itself: the store writes a temporary file and renames it)."""
    Path(path).write_text(dumps_study(study), encoding="utf-8")


def _legacy_constant(name: str) -> None:
    return None  # folders written before the strict writer may hold bare NaN / Infinity: read as null


def read_study(out_dir: str | Path) -> dict[str, Any]:
    """``DIR/study.json`` as a dict ({} when absent). Invalid JSON or a non-object raises ValueError naming the
    file. A bare NaN/Infinity (folders written before the strict writer) reads as None."""
    path = Path(out_dir) / "study.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_legacy_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
