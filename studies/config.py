"""Study configuration: one dataclass, built from built-in presets, a TOML file and command-line overrides.

A TOML file holds the same fields as the command line (underscores or dashes), e.g.::

    tasks = ["gpt"]
    size = "paper"
    optimizers = ["adamw", "signum", "stosignsgd"]
    precisions = ["fp32", "bf16", "fp8-hybrid", "fp8-states", "fp8-all", "nvfp4"]
    seeds = 3                # an integer N means seeds 0..N-1; a list means exactly those seeds
    steps = 2000
    [thresholds]
    spike_factor = 3.0

Unknown keys and malformed values raise ValueError naming the valid choices.
The precision functions (``parse_precision``, ``precision_label``, ``rounding_variants``) live in
``studies.precision`` and are re-exported here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lowprec.nn.site import GEMM_ROLES, is_delayed
from lowprec.policy import PrecisionPolicy

from studies.optimizers import ABLATION_VARIANTS, check_optimizer
from studies.precision import parse_precision, precision_label, rounding_variants

__all__ = ["PHASES", "SIZES", "SCHEDULES", "ENGINES", "AUTO_COMPILED_MIN_STEPS", "COMPILED_TASKS",
           "resolve_engine", "compiled_unsupported", "Thresholds", "StudyConfig", "RunSpec", "parse_precision",
           "precision_label", "rounding_variants", "parse_seeds", "parse_task_precisions", "parse_list",
           "parse_precisions", "parse_floats", "parse_steps", "parse_shard", "apply_overrides", "load_toml",
           "quick_config",
           "default_config", "paper_config_path", "MAX_SEEDS", "FAILURE_PRECISIONS"]

PHASES = ("tune", "main", "ablation", "rounding", "failure", "mechanism")
MAX_SEEDS = 10_000  # seeds per list (a count is checked before any list is built)
SIZES = ("quick", "default", "paper")
SCHEDULES = ("cosine", "constant")
ENGINES = ("auto", "eager", "compiled")
"""How runs train: ``eager`` (the reference), ``compiled`` (``torch.compile``'d forward and backward on the steps
telemetry does not sample; see ``studies.training``), ``auto`` (compiled where it pays: ``resolve_engine``).
A compiled run differs from eager by float reassociation (bounds: ``tests/studies/test_engine.py``) and is
reproducible on one torch thread (study jobs' default); with more threads its parallel loops may sum in another
order from one process to the next."""
AUTO_COMPILED_MIN_STEPS = 10 ** 9
"""``auto`` compiles runs of at least this many steps: in effect never yet. benchmarks/bench_step.py (2026-12-03)
measured the compiled engine slower than eager with four models in one process (re-compiles) and, alone in a process,
an fp8-all step only ~8% faster (16.4 vs 17.9 ms): not worth compiling (~10-80 s per run and process) on the study's
runs. ``--engine compiled`` selects it explicitly."""
COMPILED_TASKS = ("gpt", "text")
"""Tasks with a compiled forward (``TaskRun.compiled``); the MoE's token dispatch has data-dependent shapes."""


@dataclass
class Thresholds:
    """Divergence detection thresholds (recorded in study.json and in every run's configuration).

    A run diverges at the first of:
    - ``nan`` / ``inf``: a non-finite training or validation loss;
    - ``spike``: for ``spike_patience`` consecutive steps after the first ``warmup_steps`` steps, the training loss
      exceeds ``spike_factor`` × its running minimum AND the running minimum + ``spike_min_rise`` × |initial loss|
      (the second condition keeps losses that approach zero, e.g. on convex tasks, from tripping on noise);
    - ``blow-up``: for ``blowup_patience`` consecutive evaluations after warm-up, the validation loss exceeds the
      initial validation loss + ``blowup_margin`` × |initial validation loss|.
    """

    spike_factor: float = 3.0
    spike_min_rise: float = 0.1
    spike_patience: int = 2
    warmup_steps: int = 10
    blowup_margin: float = 0.1
    blowup_patience: int = 2

    def validate(self) -> "Thresholds":
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"threshold {f.name} must be a non-negative number, got {v!r}")
        if self.spike_factor <= 1:
            raise ValueError(f"threshold spike_factor must be > 1, got {self.spike_factor!r}")
        return self


@dataclass
class StudyConfig:
    """Everything that defines a study. ``None`` means "the task's default" (steps, eval_every, LR grid)."""

    tasks: list[str] = field(default_factory=lambda: ["gpt"])
    size: str = "default"
    data: str | None = None
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "signum", "stosignsgd"])
    precisions: list[str] = field(
        default_factory=lambda: ["fp32", "bf16", "fp8-hybrid", "fp8-states", "fp8-all", "fp8-all-unscaled", "nvfp4"])
    task_precisions: dict[str, list[str]] = field(default_factory=dict)  # main-phase precisions per task
                                                     # (a task not listed: ``precisions``)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int | None = None
    tokens: int | None = None
    lrs: list[float] | None = None
    eval_every: int | None = None
    schedule: str = "cosine"
    warmup_frac: float = 0.05
    telemetry_every: int = 10
    phases: list[str] = field(default_factory=lambda: list(PHASES))
    # fair protocol
    tune_precision: str = "fp32"
    tune_seeds: list[int] = field(default_factory=lambda: [0])
    tune_per_precision: bool = False
    tune_max_extensions: int = 1                     # edge extensions of an optimizer's LR grid (0: none)
    target_optimizer: str = "adamw"
    target_slack: float = 0.02
    # ablation / rounding / mechanism phases
    ablation_optimizers: list[str] = field(default_factory=lambda: ["stosignsgd", *ABLATION_VARIANTS])
    ablation_precision: str = "fp8-all"
    ablation_seeds: list[int] | None = None          # None: the study's seeds
    ablation_tasks: list[str] | None = None          # None: every study task
    rounding_optimizers: list[str] | None = None     # None: the study's optimizers
    rounding_precision: str = "fp8-all"
    rounding_seeds: list[int] | None = None          # None: the first study seed
    rounding_tasks: list[str] | None = None          # None: every study task
    # horizon ladder (studies.protocol): steps per horizon; None = one horizon (steps / tokens / task default)
    horizons: list[int] | None = None
    horizon_precisions: list[str] | None = None      # precisions off the middle horizon (None: the main ones)
    # FP8 failure map (phase "failure"): optimizers x storage policies x seeds x failure_horizons
    failure_precisions: list[str] = field(default_factory=list)
    failure_optimizers: list[str] = field(default_factory=lambda: ["adamw", "signum", "stosignsgd"])
    failure_seeds: list[int] | None = None           # None: the study's seeds
    failure_horizons: list[int] | None = None        # None: the two longest horizons (or the one run length)
    mechanism_tasks: list[str] = field(default_factory=lambda: ["convex-l1"])
    mechanism_optimizers: list[str] = field(default_factory=lambda: ["signsgd", "signum", "stosignsgd"])
    mechanism_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    mechanism_steps: int | None = None
    mechanism_size: str | None = None                # None: the study's size
    thresholds: Thresholds = field(default_factory=Thresholds)
    engine: str = "auto"                             # ENGINES: eager, compiled, or auto (resolve_engine)
    workers: int = 2
    out: str = "precision-sweep-results"
    report: bool = True

    def validate(self) -> "StudyConfig":
        """Check names and values; raise ValueError (one line, naming the valid choices) on the first problem."""
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; valid: {', '.join(SIZES)}")
        if self.mechanism_size is not None and self.mechanism_size not in SIZES:
            raise ValueError(f"unknown mechanism_size {self.mechanism_size!r}; valid: {', '.join(SIZES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        for p in self.phases:
            if p not in PHASES:
                raise ValueError(f"unknown phase {p!r}; valid: {', '.join(PHASES)}")
        for name in [*self.optimizers, *self.ablation_optimizers, *(self.rounding_optimizers or []),
                     *self.mechanism_optimizers, *self.failure_optimizers, self.target_optimizer]:
            check_optimizer(name)
        from studies.tasks import get_task  # validates task names (ValueError lists TASKS)

        for t in [*self.tasks, *(self.mechanism_tasks if "mechanism" in self.phases else [])]:
            get_task(t, size=self.size if t in self.tasks else (self.mechanism_size or self.size), data=self.data)
        for what, names in [("task_precisions", self.task_precisions), ("ablation_tasks", self.ablation_tasks or []),
                            ("rounding_tasks", self.rounding_tasks or [])]:
            for t in names:
                if t not in self.tasks:
                    raise ValueError(f"{what}: {t!r} is not a task of this study; valid: {', '.join(self.tasks)}")
        # the edge: every precision is checked (a bad one raises ValueError naming what is valid) and old '+'
        # strings are translated once, so every later key and run id uses one spelling
        self.precisions = [precision_label(p) for p in self.precisions]
        self.task_precisions = {t: [precision_label(p) for p in ps] for t, ps in self.task_precisions.items()}
        self.tune_precision = precision_label(self.tune_precision)
        self.ablation_precision = precision_label(self.ablation_precision)
        self.rounding_precision = precision_label(self.rounding_precision)
        self.failure_precisions = [precision_label(p) for p in self.failure_precisions]
        if self.horizon_precisions is not None:
            self.horizon_precisions = [precision_label(p) for p in self.horizon_precisions]
        for name in ("horizons", "failure_horizons"):
            v = getattr(self, name)
            if v is not None and (not v or any(not isinstance(h, int) or isinstance(h, bool) or h <= 0 for h in v)):
                raise ValueError(f"{name} must be positive integers (steps), got {v!r}")
        for name, v in [("steps", self.steps), ("tokens", self.tokens), ("eval_every", self.eval_every),
                        ("mechanism_steps", self.mechanism_steps)]:
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give steps or tokens, not both")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a positive integer, got {self.workers!r}")
        if not isinstance(self.telemetry_every, int) or self.telemetry_every < 1:
            raise ValueError(f"telemetry_every must be a positive integer, got {self.telemetry_every!r}")
        if self.lrs is not None:
            if not self.lrs or any(not isinstance(x, (int, float)) or x <= 0 for x in self.lrs):
                raise ValueError(f"lrs must be positive numbers, got {self.lrs!r}")
        for name in ("seeds", "tune_seeds", "mechanism_seeds", "ablation_seeds", "rounding_seeds",
                     "failure_seeds"):
            v = getattr(self, name)
            if v is not None and (not v or any(not isinstance(s, int) or s < 0 for s in v)):
                raise ValueError(f"{name} must be non-negative integers, got {v!r}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac!r}")
        if (not isinstance(self.tune_max_extensions, int) or isinstance(self.tune_max_extensions, bool)
                or self.tune_max_extensions < 0):
            raise ValueError(f"tune_max_extensions must be a non-negative integer, got {self.tune_max_extensions!r}")
        if self.target_slack < 0:
            raise ValueError(f"target_slack must be >= 0, got {self.target_slack!r}")
        self.thresholds.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunSpec:
    """The full configuration of one run; its hash is the run id.

    ``steps``/``tokens``/``eval_every`` of None mean the task's default (steps from tokens via tokens_per_step).
    ``precision`` is given as a preset name, a policy string or a ``PrecisionPolicy`` and is kept as its label
    (see ``precision_label``); ``policy`` is the parsed ``PrecisionPolicy`` the run trains with.
    """

    task: str
    optimizer: str
    precision: str
    lr: float
    seed: int
    phase: str = "custom"
    size: str = "default"
    data: str | None = None
    steps: int | None = None
    tokens: int | None = None
    eval_every: int | None = None
    schedule: str = "cosine"
    warmup_frac: float = 0.05
    telemetry_every: int = 10
    thresholds: dict = field(default_factory=lambda: dataclasses.asdict(Thresholds()))
    data_sha256: str | None = None  # content hash of ``data`` (in the run id, so a changed file is a new run)
    engine: str = "eager"           # "eager" or "compiled" (resolved; in the run id when compiled)

    def __post_init__(self) -> None:
        if isinstance(self.precision, PrecisionPolicy):
            object.__setattr__(self, "policy", self.precision)
        object.__setattr__(self, "precision", precision_label(self.precision))

    @cached_property
    def policy(self) -> PrecisionPolicy:
        """The precision policy of this run (parsed once)."""
        return parse_precision(self.precision)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {"thresholds": dict(self.thresholds)}
        if d["data_sha256"] is None:  # runs without a data file keep the run ids they had before the field
            del d["data_sha256"]
        if d["engine"] == "eager":    # eager runs keep the run ids they had before the field
            del d["engine"]
        return d

    def planned_steps(self, task, world: int = 1) -> int:
        """Training steps of this run on ``task`` (a ``studies.tasks.Task``) with ``world`` processes per step:
        ``steps``, else ``tokens`` / tokens per step (rounded up), else the task's default."""
        if self.steps is not None:
            return int(self.steps)
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / (int(task.tokens_per_step) * world)))
        return int(task.default_steps)

    @property
    def config_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def run_id(self) -> str:
        """12 hex digits of the SHA-256 of the configuration (JSON, sorted keys)."""
        return hashlib.sha256(self.config_json.encode()).hexdigest()[:12]

    @property
    def reuse_key(self) -> str:
        """Hash of the configuration without its phase, with the policy in canonical form: two runs with equal
        keys produce identical results ("fp8-all" and its written-out policy string are the same run)."""
        d = self.to_dict()
        d.pop("phase")
        d["precision"] = str(self.policy)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        return cls(**json.loads(text))


# ----------------------------------------------------------------------------------------------- parsing
def parse_seeds(value: Any) -> list[int]:
    """Seeds: an integer N (or the string "N") means seeds 0..N-1; a list or "a,b,c" means exactly those.

    A single explicit seed is written with a trailing comma, e.g. "7,".
    """
    if isinstance(value, bool):
        raise ValueError(f"seeds: expected a count or a list of integers, got {value!r}")
    if isinstance(value, int):
        if not 1 <= value <= MAX_SEEDS:  # checked before the list is built
            raise ValueError(f"seeds: a count must be in 1..{MAX_SEEDS}, got {value}")
        return list(range(value))
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise ValueError(f"seeds: expected non-negative integers, got {value!r}")
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            if "," in text:
                return parse_seeds([int(v) for v in text.split(",") if v.strip()])
            return parse_seeds(int(text))
        except ValueError:
            raise ValueError(f"seeds: expected a count N or a list like 0,1,2, got {value!r}") from None
    raise ValueError(f"seeds: expected a count or a list of integers, got {value!r}")


def parse_task_precisions(value: Any) -> dict[str, list[str]]:
    """A table task name -> precisions (a list, or a string as for ``precisions``)."""
    if not isinstance(value, dict):
        raise ValueError(f"task_precisions: expected a table of task = [precisions], got {value!r}")
    return {str(task): parse_precisions(precs) for task, precs in value.items()}


def parse_list(value: Any, what: str) -> list[str]:
    """A comma-separated string or a list of strings -> list of non-empty stripped strings."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise ValueError(f"{what}: expected a comma-separated list of names, got {value!r}")
    items = [v for v in items if v]
    if not items:
        raise ValueError(f"{what}: empty list")
    return items


def parse_precisions(value: Any) -> list[str]:
    """Precisions: ';'-separated when any item is a policy string containing commas, else ','-separated."""
    if isinstance(value, str):
        sep = ";" if ("=" in value) else ","
        items = [v.strip() for v in value.split(sep) if v.strip()]
        if not items:
            raise ValueError("precisions: empty list")
        return items
    return parse_list(value, "precisions")


def parse_floats(value: Any, what: str) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected numbers like 1e-3,3e-3, got {value!r}") from None
    if not out or any(not (v > 0) or v != v or v == float("inf") for v in out):
        raise ValueError(f"{what}: expected positive finite numbers, got {value!r}")
    return out


def parse_steps(value: Any, what: str) -> list[int]:
    """Step counts: a list of positive integers or "250,1000,4000"."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        out = [int(v) if isinstance(v, str) else v for v in items if not isinstance(v, str) or v.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected positive integers like 250,1000, got {value!r}") from None
    if not out or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in out):
        raise ValueError(f"{what}: expected positive integers like 250,1000, got {value!r}")
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """"K/N" with 0 <= K < N -> (K, N)."""
    try:
        k, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"shard: expected K/N with 0 <= K < N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"shard: expected K/N with 0 <= K < N (e.g. 0/4), got {text!r}")
    return k, n


_FIELD_PARSERS = {
    "tasks": lambda v: parse_list(v, "tasks"),
    "optimizers": lambda v: parse_list(v, "optimizers"),
    "precisions": parse_precisions,
    "seeds": parse_seeds,
    "tune_seeds": parse_seeds,
    "ablation_seeds": lambda v: None if v is None else parse_seeds(v),
    "rounding_seeds": lambda v: None if v is None else parse_seeds(v),
    "mechanism_seeds": parse_seeds,
    "failure_seeds": lambda v: None if v is None else parse_seeds(v),
    "failure_precisions": lambda v: [] if not v else parse_precisions(v),
    "failure_optimizers": lambda v: parse_list(v, "failure_optimizers"),
    "horizon_precisions": lambda v: None if v is None else parse_precisions(v),
    "horizons": lambda v: None if v is None else parse_steps(v, "horizons"),
    "failure_horizons": lambda v: None if v is None else parse_steps(v, "failure_horizons"),
    "lrs": lambda v: None if v is None else parse_floats(v, "lrs"),
    "phases": lambda v: parse_list(v, "phases"),
    "ablation_optimizers": lambda v: parse_list(v, "ablation_optimizers"),
    "rounding_optimizers": lambda v: None if v is None else parse_list(v, "rounding_optimizers"),
    "mechanism_tasks": lambda v: parse_list(v, "mechanism_tasks"),
    "ablation_tasks": lambda v: None if v is None else parse_list(v, "ablation_tasks"),
    "rounding_tasks": lambda v: None if v is None else parse_list(v, "rounding_tasks"),
    "task_precisions": lambda v: parse_task_precisions(v),
    "mechanism_optimizers": lambda v: parse_list(v, "mechanism_optimizers"),
}


def _typed(name: str, value: Any, current: Any, ftype: str) -> Any:
    """Check a scalar field's type against its annotation (as a string, since annotations are postponed)."""
    if value is None:
        if "None" in ftype:
            return None
        raise ValueError(f"{name}: a value is required")
    if ftype.startswith("bool"):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        return value
    if ftype.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return value
    if ftype.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if ftype.startswith("str"):
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value
    return value


_PER_TASK_FIELDS = {"task_precisions", "ablation_tasks", "rounding_tasks"}


def apply_overrides(cfg: StudyConfig, values: dict[str, Any]) -> StudyConfig:
    """Return a copy of ``cfg`` with ``values`` (field name -> value, dashes allowed) applied and type-checked."""
    cfg = dataclasses.replace(cfg, thresholds=dataclasses.replace(cfg.thresholds))
    fields = {f.name: f for f in dataclasses.fields(StudyConfig)}
    keys = {k.replace("-", "_") for k in values}
    if "tasks" in keys:  # per-task settings belong to the tasks they were written for: choosing tasks resets them
        for key in _PER_TASK_FIELDS - keys:
            setattr(cfg, key, fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING
                    else fields[key].default)
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in fields:
            raise ValueError(f"unknown setting {raw_key!r}; valid: {', '.join(fields)}")
        if key == "thresholds":
            if not isinstance(value, dict):
                raise ValueError("thresholds: expected a table of threshold values")
            tfields = {f.name: f for f in dataclasses.fields(Thresholds)}
            for tk, tv in value.items():
                tk = tk.replace("-", "_")
                if tk not in tfields:
                    raise ValueError(f"unknown threshold {tk!r}; valid: {', '.join(tfields)}")
                setattr(cfg.thresholds, tk, _typed(tk, tv, None, str(tfields[tk].type)))
            continue
        if key in _FIELD_PARSERS:
            setattr(cfg, key, _FIELD_PARSERS[key](value))
        else:
            setattr(cfg, key, _typed(key, value, getattr(cfg, key), str(fields[key].type)))
    return cfg


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML study file into a plain dict (a top-level [study] table is merged into the top level)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    if "study" in data and isinstance(data["study"], dict):
        data = {**{k: v for k, v in data.items() if k != "study"}, **data["study"]}
    return data


def quick_config() -> StudyConfig:
    """The ``--quick`` smoke grid: adamw and stosignsgd × {fp32, fp8-all} on the tiny GPT, one seed, no tuning."""
    return StudyConfig(
        tasks=["gpt"], size="quick", optimizers=["adamw", "stosignsgd"], precisions=["fp32", "fp8-all"],
        seeds=[0], phases=["main"], telemetry_every=5, workers=2)


# the FP8 failure map's storage policies: optimizer states (for AdamW: both moments) unscaled E4M3, E4M3 per
# tensor, E4M3 block-128, E5M2 per tensor, FP8-LM's E4M3 first / fp16 second moment, FP4 and INT4 states, and bf16
# master weights with round-to-nearest; everything else in full precision, so only the storage differs
FAILURE_PRECISIONS = ["state=e4m3", "state=e4m3:tensor", "state=e4m3:block128", "state=e5m2:tensor",
                      "state=e4m3:tensor,state.exp_avg_sq=fp16", "state=e2m1:block32", "state=int4:block32",
                      "master=bf16"]


def default_config() -> StudyConfig:
    """The default study (``precision-sweep run`` with no arguments), sized for ~10 minutes on 2 cores: the tiny
    GPT at "quick" size on a horizon ladder of 100 / 200 / 400 steps (LR tuned at each), {adamw, signsgd, signum,
    lion, stosignsgd} x {fp32, fp8-all, nvfp4} at 200 steps and {fp32, fp8-all} at 100 and 400, 3 seeds; ablations
    (each variant tuned) and rounding at 200 steps; the FP8 failure map (adamw, signum, stosignsgd x
    FAILURE_PRECISIONS x 3 seeds at 200 and 400 steps); the mechanism on convex-l1 and convex-l1-weak ("default"
    size, 2,000 steps, 3 seeds, adamw, lion and the other sign methods). The MoE,
    bf16/fp8-hybrid/fp8-states and the larger sizes are in studies/paper.toml. README "Results" has its time."""
    return StudyConfig(tasks=["gpt"], size="quick",
                       optimizers=["adamw", "signsgd", "signum", "lion", "stosignsgd"],
                       precisions=["fp32", "fp8-all", "nvfp4"], seeds=[0, 1, 2], horizons=[100, 200, 400],
                       horizon_precisions=["fp32", "fp8-all"], rounding_optimizers=["adamw", "stosignsgd"],
                       failure_precisions=list(FAILURE_PRECISIONS),
                       mechanism_tasks=["convex-l1", "convex-l1-weak"], mechanism_size="default",
                       mechanism_optimizers=["signsgd", "signum", "lion", "stosignsgd", "adamw"])


def resolve_engine(engine: str, task: str, steps: int, policy: PrecisionPolicy) -> str:
    """The engine one run trains with: ``eager`` or ``compiled``. ``auto`` gives compiled for a task in
    ``COMPILED_TASKS`` with at least ``AUTO_COMPILED_MIN_STEPS`` steps and no delayed scaling, else eager;
    ``compiled`` where that is impossible is a ValueError naming why."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    why = compiled_unsupported(task, policy)
    if engine == "compiled" and why:
        raise ValueError(f"engine compiled: {why}; use engine eager or auto")
    if engine == "auto":
        return "compiled" if not why and steps >= AUTO_COMPILED_MIN_STEPS else "eager"
    return engine


def compiled_unsupported(task: str, policy: PrecisionPolicy) -> str:
    """Why a run of ``task`` under ``policy`` cannot use the compiled engine ("" when it can)."""
    if task not in COMPILED_TASKS:
        return f"task {task!r} has no compiled forward (tasks with one: {', '.join(COMPILED_TASKS)})"
    delayed = [r for r in GEMM_ROLES if is_delayed(getattr(policy, r))]
    if delayed:
        return f"delayed scaling ({', '.join(delayed)}) keeps its amax history in Python: eager only"
    return ""


def paper_config_path() -> Path:
    """Path of the full-size study file shipped with the package."""
    return Path(__file__).with_name("paper.toml")
