"""What a study does after its runs: data hashes, tokens-to-target filled in from metrics.csv, version stamps."""
from __future__ import annotations

import math
import platform
import sys
from pathlib import Path

from studies.records import file_sha256, package_version, update_records

__all__ = ["data_hash", "finalize", "versions"]

_HASHES: dict[tuple[str, int, int], str] = {}


def data_hash(path: str | Path) -> str:
    """SHA-256 of the data file's content (cached per path, size and modification time)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def finalize(out_dir: str | Path, targets: dict[str, float]) -> None:
    """Fill target_loss and tokens_to_target of every finished row of a task with a target, from metrics.csv."""
    import pandas as pd

    from studies.stats import run_tokens_to_target

    out_dir = Path(out_dir)

    def fill(r: dict) -> dict:
        t = targets.get(r.get("task"))
        if t is None or not math.isfinite(t) or r.get("status") == "error":
            return r
        path = out_dir / "runs" / r["run_id"] / "metrics.csv"
        if not path.exists():
            return r
        try:
            m = pd.read_csv(path, usecols=["tokens", "val_loss"])
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a readable metrics file ({type(exc).__name__}: {exc}); delete the "
                             f"folder {path.parent} to rerun that run") from None
        r["target_loss"] = t
        r["tokens_to_target"] = run_tokens_to_target(m["tokens"].to_numpy(float), m["val_loss"].to_numpy(float), t)
        return r

    update_records(out_dir, fill)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere; "unknown" if neither says)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    """Python, torch, numpy, pandas, platform, this package's version, and the CPU: its model and the vector
    instructions torch's kernels dispatch to (``cpu_capability``). Runs are bit-reproducible on one machine; on
    another the same runs gave other numbers (README, "Results"), most likely because torch and the BLAS choose
    their kernels by CPU."""
    import numpy
    import pandas
    import torch

    v = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
         "pandas": pandas.__version__, "platform": platform.platform(), "cpu": cpu_model(),
         "cpu_capability": str(torch.backends.cpu.get_cpu_capability())}
    version = package_version()
    if version != "unknown":
        v["lowprec-stosign"] = version
    return v
