"""Per-run records, the rebuild of results.csv from them, integrity checks, study fingerprints and the merge of
shard folders.

Every finished run writes ``DIR/runs/<run_id>/result.json`` (atomic rename) beside its metrics: its results row as
results.csv text cells (``studies.schema.format_row``) and the torch thread count it ran with. The records are the
truth; ``results.csv`` is rebuilt from them (:func:`rebuild_results`), rows in a stable order (phase, task,
optimizer, precision, lr, seed, run id), so the same study gives the same file whatever ran it (process pool,
submitit, shards + merge).

Damage is named, never counted: a results.csv row that does not follow the schema (e.g. a truncated last row) or a
run id that appears on two lines is reported as ``FILE line N``. On ``run`` a damaged or duplicated row whose run has
a record is rebuilt from it (with a note); one without a record is refused. On ``report`` any damage is refused.

A study fingerprint (:func:`study_fingerprint`: the configuration that defines the numbers, the package version,
the SHA-256 of the ``--data`` file's content and the torch thread count) is kept in study.json; a folder holds one
study unless ``--append`` adds another (:func:`check_folder`).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from studies import schema
from studies.config import PHASES
from studies.schema import RESULT_COLUMNS, RESULT_TYPES, ResultRow
from studies.store import ResultsStore, write_atomic, write_json_atomic

__all__ = ["RECORD_NAME", "to_result_row", "write_record", "read_record", "read_records", "scan_results_csv",
           "check_results", "rebuild_results", "update_records", "file_sha256", "package_version",
           "study_fingerprint", "check_folder", "merge_folders"]

RECORD_NAME = "result.json"
# configuration fields that change no number of any run: how and where it runs, which phases run now, and the
# LR-extension budget (a larger one continues the same tune phase)
_NOT_DEFINING = ("workers", "out", "report", "phases", "tune_max_extensions")


# ------------------------------------------------------------------------------------------------ rows
def to_result_row(row: ResultRow | Mapping[str, Any]) -> ResultRow:
    """A ResultRow from a typed row, results.csv text cells, or a mix (e.g. ``""`` for a missing optional int).
    Unknown or missing columns raise ValueError naming them."""
    if isinstance(row, ResultRow):
        return row
    extra = [k for k in row if k not in RESULT_TYPES]
    missing = [c for c in RESULT_COLUMNS if c not in row]
    if extra or missing:
        raise ValueError(f"a results row must have the columns of studies.schema.RESULT_COLUMNS; unknown: "
                         f"{extra or 'none'}, missing: {missing or 'none'}")
    values = schema.typed_row({c: row[c] for c in RESULT_COLUMNS})
    return schema.parse_row(schema.format_row(values), f"run {values['run_id']}")


def _order(r: ResultRow) -> tuple:
    return (PHASES.index(r.phase) if r.phase in PHASES else len(PHASES), r.phase, r.task, r.optimizer,
            r.precision, r.lr, r.seed, r.run_id)


def _record_path(out_dir: str | Path, run_id: str) -> Path:
    return Path(out_dir) / "runs" / run_id / RECORD_NAME


def write_record(out_dir: str | Path, row: ResultRow | Mapping[str, Any], *, threads: int | None = None) -> Path:
    """Write ``DIR/runs/<run_id>/result.json`` for ``row`` atomically; return its path."""
    r = to_result_row(row)
    path = _record_path(out_dir, r.run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if threads is None and path.is_file():  # keep the thread count of the run's own record
        try:
            threads = read_record(path)[1]
        except ValueError:
            threads = None
    write_json_atomic(path, {"row": schema.format_row(r), "torch_threads": threads})
    return path


def read_record(path: str | Path) -> tuple[ResultRow, int | None]:
    """(row, torch thread count) of a result.json; ValueError naming the file when it is not a valid record."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        cells = data["row"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a valid run record ({type(exc).__name__}: {exc})") from None
    row = schema.parse_row(cells, str(path))
    if row.run_id != path.parent.name:
        raise ValueError(f"{path} holds run {row.run_id!r}, not the run of its folder {path.parent.name!r}")
    return row, data.get("torch_threads")


def read_records(out_dir: str | Path) -> dict[str, ResultRow]:
    """run id -> row of every record under ``DIR/runs``."""
    runs = Path(out_dir) / "runs"
    if not runs.is_dir():
        return {}
    return {p.parent.name: read_record(p)[0] for p in sorted(runs.glob(f"*/{RECORD_NAME}"))}


def update_records(out_dir: str | Path, fn: Callable[[dict[str, str]], Mapping[str, Any]]) -> None:
    """Rewrite every record through ``fn`` (text cells in, row out), then rebuild results.csv."""
    for rid, row in read_records(out_dir).items():
        new = to_result_row(fn(schema.format_row(row)))
        if new != row:
            write_record(out_dir, new)
    rebuild_results(out_dir)


# ------------------------------------------------------------------------------------------- results.csv
def scan_results_csv(path: str | Path) -> tuple[dict[str, ResultRow], list[tuple[str, str | None]]]:
    """Read results.csv leniently: (run id -> row of its first good line, problems), each problem a one-line
    message naming the file and line and the run id it concerns (None when unreadable)."""
    path = Path(path)
    rows: dict[str, ResultRow] = {}
    first_line: dict[str, int] = {}
    problems: list[tuple[str, str | None]] = []
    if not path.is_file():
        return rows, problems
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in RESULT_COLUMNS if c not in header]
        if missing:
            return rows, [(f"{path} line 1: header lacks column(s) {', '.join(missing)}", None)]
        for cells in reader:
            line = reader.line_num
            rid = cells.get("run_id") or None
            try:
                row = schema.parse_row({c: cells.get(c) for c in RESULT_COLUMNS}, f"{path} line {line}")
            except ValueError as exc:
                problems.append((str(exc), rid))
                continue
            if row.run_id in rows:
                same = "an identical" if row == rows[row.run_id] else "a DIFFERENT"
                problems.append((f"{path} line {line}: run {row.run_id} duplicates line {first_line[row.run_id]} "
                                 f"({same} row; a run is never counted twice)", row.run_id))
                continue
            rows[row.run_id] = row
            first_line[row.run_id] = line
    return rows, problems


def check_results(out_dir: str | Path) -> list[ResultRow]:
    """The rows of ``DIR/results.csv``; ValueError naming file and line of the first damaged or duplicated row."""
    rows, problems = scan_results_csv(Path(out_dir) / "results.csv")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{problems[0][0]}{more}; rerun `precision-sweep run` with the same options to rebuild "
                         f"results.csv from the per-run records, or fix the file")
    return list(rows.values())


def rebuild_results(out_dir: str | Path) -> list[str]:
    """Rebuild ``DIR/results.csv`` from the records (under the store's lock); return notes on what was repaired.

    Valid rows of results.csv without a record (folders written before records existed) get a record first. A
    damaged or duplicated row whose run has no record raises ValueError naming file and line.
    """
    store = ResultsStore(out_dir)
    notes: list[str] = []
    with store.locked():
        records = read_records(out_dir)
        rows, problems = scan_results_csv(store.path)
        for msg, rid in problems:
            if rid is None or rid not in records:
                raise ValueError(f"{msg}; this run has no record ({_record_path(out_dir, rid or '<run_id>')}) to "
                                 f"rebuild it from: delete that line to rerun the run")
            notes.append(f"{msg}; rebuilt from its record")
        for rid, row in rows.items():
            if rid not in records:
                write_record(out_dir, row)
                records[rid] = row
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(RESULT_COLUMNS))
        w.writeheader()
        for r in sorted(records.values(), key=_order):
            w.writerow(schema.format_row(r))
        if records or store.path.exists():
            write_atomic(store.path, buf.getvalue())
    return notes


# ------------------------------------------------------------------------------------------- fingerprints
def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_version() -> str:
    """The installed version of lowprec-stosign ("unknown" when not installed as a package)."""
    try:
        return version("lowprec-stosign")
    except PackageNotFoundError:
        return "unknown"


def study_fingerprint(config: Mapping[str, Any], *, threads: int, data_sha256: str | None) -> dict[str, Any]:
    """{"hash", "config", "version", "data_sha256", "torch_threads"}: what defines a study's numbers. ``config`` is
    ``StudyConfig.to_dict()``; fields that only say how or where it runs (workers, out, report, phases) are left
    out (and tune_max_extensions), so shards, resumes, phase subsets and a larger LR-extension budget of one study
    share its fingerprint."""
    cfg = {k: v for k, v in config.items() if k not in _NOT_DEFINING}
    parts = {"config": cfg, "version": package_version(), "data_sha256": data_sha256, "torch_threads": threads}
    text = json.dumps(schema.to_strict_json(parts), sort_keys=True, separators=(",", ":"))
    return {"hash": hashlib.sha256(text.encode()).hexdigest()[:16], **parts}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    diffs = [k for k in sorted(set(old.get("config", {})) | set(new.get("config", {})))
             if old.get("config", {}).get(k) != new.get("config", {}).get(k)]
    for key, what in (("version", "package version"), ("data_sha256", "data content"),
                      ("torch_threads", "torch threads")):
        if old.get(key) != new.get(key):
            diffs.append(f"{what} {old.get(key)} -> {new.get(key)}")
    return ", ".join(diffs) or "fingerprint"


def _accepts(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return new["hash"] == old.get("hash") or new["hash"] in old.get("appended", [])


def check_folder(out_dir: str | Path, fingerprint: dict[str, Any], *, append: bool = False) -> dict[str, Any]:
    """The fingerprint to store in ``DIR/study.json``. A folder holding a different study raises ValueError (one
    line naming what differs) unless ``append``; then the new study is added to the folder's ``appended`` list.
    A folder without a fingerprint (written before fingerprints) is adopted."""
    old = schema.read_study(out_dir).get("fingerprint")
    if not isinstance(old, dict) or _accepts(old, fingerprint):
        if isinstance(old, dict) and old.get("appended"):
            return {**fingerprint, "appended": list(old["appended"]) + [old["hash"]]}
        return fingerprint
    if not append:
        raise ValueError(f"{out_dir} already holds a different study (differs in: {_differences(old, fingerprint)}); "
                         f"use another --out, or --append to add this study to the folder")
    return {**fingerprint, "appended": list(old.get("appended", [])) + [old["hash"]]}


# ------------------------------------------------------------------------------------------- merge
# wall time differs between equal runs; the target columns are derived from the whole study and recomputed after a
# merge (studies.protocol.merge_study)
_IGNORED_IN_CONFLICTS = ("wall_s", "target_loss", "tokens_to_target")


def _rows_of(folder: Path) -> dict[str, ResultRow]:
    records = read_records(folder)
    rows, problems = scan_results_csv(folder / "results.csv")
    for msg, rid in problems:
        if rid is None or rid not in records:
            raise ValueError(msg)
    return {**rows, **records}


def _conflict(a: ResultRow, b: ResultRow) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    out = []
    for c in RESULT_COLUMNS:
        if c in _IGNORED_IN_CONFLICTS:
            continue
        va, vb = da[c], db[c]
        if va != vb and not (isinstance(va, float) and isinstance(vb, float) and va != va and vb != vb):
            out.append(f"{c} {va!r} vs {vb!r}")
    return out


def _copy_run(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(".") and f.name != RECORD_NAME:
            tmp = dst / f".{f.name}.tmp-merge"
            shutil.copyfile(f, tmp)
            tmp.replace(dst / f.name)


def merge_folders(out_dir: str | Path, folders: Iterable[str | Path]) -> dict[str, int]:
    """Combine shard folders into ``out_dir``: every run once (deduplicated by run id; a failed run gives way to
    a finished one), its files copied, records written, results.csv rebuilt, study.json taken from the first
    folder. Raises ValueError when the folders hold different studies (fingerprints) or the same run id with
    different numbers. Returns {"runs", "duplicates", "folders"}. The target columns are kept as found: use
    ``studies.protocol.merge_study`` to recompute them from the merged study."""
    out = Path(out_dir)
    folders = [Path(f) for f in folders]
    if not folders:
        raise ValueError("merge: give at least one shard folder")
    studies = []
    for f in folders:
        if not (f / "results.csv").is_file() and not (f / "runs").is_dir():
            raise ValueError(f"merge: {f} is not a results folder (no results.csv or runs/)")
        studies.append(schema.read_study(f))
    prints = [(f, s.get("fingerprint")) for f, s in zip(folders, studies) if isinstance(s.get("fingerprint"), dict)]
    for f, fp in prints[1:]:
        if fp["hash"] != prints[0][1]["hash"]:
            raise ValueError(f"merge: {f} holds a different study than {prints[0][0]} (differs in: "
                             f"{_differences(prints[0][1], fp)})")
    if prints and (out / "study.json").is_file():
        check_folder(out, prints[0][1])
    chosen: dict[str, tuple[ResultRow, Path]] = {}
    dups = 0
    for f in folders:
        for rid, row in _rows_of(f).items():
            if rid not in chosen:
                chosen[rid] = (row, f)
                continue
            dups += 1
            prev, pf = chosen[rid]
            if "error" in (prev.status, row.status):
                if prev.status == "error" and row.status != "error":
                    chosen[rid] = (row, f)
                continue
            diff = _conflict(prev, row)
            if diff:
                raise ValueError(f"merge: run {rid} differs between {pf} and {f} ({'; '.join(diff[:3])}); the "
                                 f"folders do not hold the same runs, refusing to merge")
    existing = read_records(out)
    for rid, (row, f) in chosen.items():
        if rid in existing and existing[rid].status != "error" and row.status != "error":
            diff = _conflict(existing[rid], row)
            if diff:
                raise ValueError(f"merge: run {rid} differs between {out} and {f} ({'; '.join(diff[:3])})")
            continue
        if (f / "runs" / rid).is_dir() and f.resolve() != out.resolve():
            _copy_run(f / "runs" / rid, out / "runs" / rid)
        write_record(out, row)
    rebuild_results(out)
    study = dict(studies[0])
    study.update(shard=None, status=f"merged from {len(folders)} folder(s)")
    if prints:
        study["fingerprint"] = prints[0][1]
    write_json_atomic(out / "study.json", study)
    return {"runs": len(chosen), "duplicates": dups, "folders": len(folders)}
