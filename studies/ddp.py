"""One run of the precision sweep under torchrun: data-parallel (DistributedDataParallel) over N processes.

    torchrun --nproc_per_node=2 -m studies.ddp --task gpt --optimizer stosignsgd --precision fp8-all \\
        --lr 1e-3 --steps 200 --out DIR [--comm fp32|sign|sign-majority]

The run is the sweep's run (``studies.training.execute_run``: same task, ``lowprec.nn.convert``, ``lowprec.optim.wrap``,
telemetry, divergence detection, ``metrics.csv``, results row), with these differences:

- **Data**: every process builds the same model (same seed) and draws its own training batches: at step ``s``
  rank ``r`` of ``W`` trains on the task's batch ``s·W + r``. The global batch is therefore ``W`` times the
  task's batch, ``tokens`` counts all ranks' tokens, and ``--tokens T`` gives ``ceil(T / (W · tokens per batch))``
  steps. A run on W processes is not the run on one process with the same steps (W× the data per step).
- **Gradients**: DDP averages them over the ranks: an fp32 all-reduce (``--comm fp32``), or 1-bit stochastic signs
  plus one fp32 bound per 1024 coordinates (``--comm sign``, ``stosign.distributed.stochastic_sign_hook``,
  unbiased), or the majority vote of those signs (``--comm sign-majority``). Every rank then takes the same
  optimizer step (same optimizer seed), so the replicas stay bit-identical; the run checks it at the end
  (SHA-256 of every rank's parameters, in ``runs/<run_id>/replicas.json`` and the row's ``replicas_identical``).
- **Loss and divergence**: the logged training loss is the mean over ranks; the divergence reason is agreed by an
  all-reduce every step (the most severe one any rank saw), so all ranks stop at the same step.
- **Outputs**: rank 0 writes ``DIR/runs/<run_id>/metrics.csv`` and appends the row to ``DIR/results.csv`` through
  ``studies.sweep.ResultsStore`` (same schema). The row adds ``world_size``, ``comm``, ``comm_bytes_sent`` (rank
  0's gradient bytes on the wire over the run), ``comm_allreduce_bytes`` (what a ring all-reduce of the fp32
  gradients sends: 2(W−1)/W · 4 bytes per coordinate and step; equal to comm_bytes_sent for ``--comm fp32``) and
  ``comm_ratio``. ``world_size`` and ``comm`` are also in ``config_json`` and hence in the run id: a DDP run
  never collides with a single-process run of the same configuration. Rerunning a completed run is a no-op.

Backend: gloo on CPU, nccl when ``--device cuda`` (the default when CUDA is available; rank r uses
``cuda:LOCAL_RANK``). Several machines: run the same command on each node with torchrun's ``--nnodes``,
``--node_rank`` and ``--rdzv_endpoint``.
"""
import argparse
import dataclasses
import datetime
import hashlib
import inspect
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from studies.arguments import OneLineParser, nonneg_int, positive_float, positive_int
from studies.config import RunSpec
from studies.training import RUN_FAILURES, Parallel, execute_run

__all__ = ["COMMS", "DDPRunSpec", "DDPParallel", "run_ddp", "param_digest", "build_parser", "main"]

COMMS = ("fp32", "sign", "sign-majority")
# divergence reasons by severity: the all-reduced maximum is the reason every rank adopts
_REASONS = ("", "spike", "blow-up", "inf", "nan")


@dataclass(frozen=True)
class DDPRunSpec(RunSpec):
    """A :class:`studies.config.RunSpec` plus how it is distributed (part of its configuration and run id)."""

    world_size: int = 1
    comm: str = "fp32"


class _DDP(DistributedDataParallel):
    """DistributedDataParallel that forwards unknown attributes to the wrapped model (e.g. the MoE's
    ``aux_loss``, read by the task after the forward pass)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


@dataclass
class _AllReduceBytes:
    """State of :func:`_counting_allreduce_hook`: bytes this rank sends in fp32 ring all-reduces."""

    bytes_sent: int = 0
    allreduce_bytes: int = 0
    buckets: int = 0


def _counting_allreduce_hook(state: _AllReduceBytes,
                             bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default averaging all-reduce, counting 2(W−1)/W · bytes of the bucket (a ring all-reduce)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buf = bucket.buffer()
    world = dist.get_world_size()
    sent = 2 * (world - 1) * buf.element_size() * buf.numel() // world
    state.bytes_sent += sent
    state.allreduce_bytes += sent
    state.buckets += 1
    return allreduce_hook(None, bucket)


class DDPParallel(Parallel):
    """This process as one rank of a data-parallel run (the process group must be initialised)."""

    def __init__(self, comm: str = "fp32", *, seed: int = 0, device: str = "cpu", segment: int | None = 1024):
        if comm not in COMMS:
            raise ValueError(f"unknown comm {comm!r}; valid: {', '.join(COMMS)}")
        self.comm, self.seed, self.segment = comm, seed, segment
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.ddp: DistributedDataParallel | None = None
        self.comm_state: Any = None

    def wrap(self, trun) -> None:
        from stosign.distributed import StochasticSignState, stochastic_sign_hook
        from studies.tasks import MoE

        model = trun.model
        # top-k routing can leave an expert without tokens on a rank: let DDP find the unused parameters
        unused = any(isinstance(m, MoE) for m in model.modules())
        ids = [torch.device(self.device).index or 0] if torch.device(self.device).type == "cuda" else None
        # buffers are constants built identically on every rank: no sync in forward (val_loss runs without
        # collectives, on every rank); ``forward_sync_buffers`` replaces ``broadcast_buffers`` in newer torch
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel)
                   .parameters else "broadcast_buffers")
        self.ddp = _DDP(model, device_ids=ids, find_unused_parameters=unused, **{no_sync: False})
        if self.comm == "fp32":
            self.comm_state = _AllReduceBytes()
            self.ddp.register_comm_hook(self.comm_state, _counting_allreduce_hook)
        else:
            vote = "majority" if self.comm == "sign-majority" else "mean"
            self.comm_state = StochasticSignState(seed=1_000_003 * self.seed + 777, segment=self.segment, vote=vote)
            self.ddp.register_comm_hook(self.comm_state, stochastic_sign_hook)
        trun.model = self.ddp

    def batch(self, step: int) -> int:
        return step * self.world + self.rank

    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def agree(self, reason: str) -> str:
        code = torch.tensor([_REASONS.index(reason)], dtype=torch.int64, device=self.device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return _REASONS[int(code)]

    def comm_columns(self) -> dict[str, Any]:
        """Row columns: world_size, comm and this rank's gradient bytes on the wire vs an fp32 all-reduce."""
        s = self.comm_state
        sent = int(getattr(s, "bytes_sent", 0))
        ref = int(getattr(s, "allreduce_bytes", 0))
        return {"world_size": self.world, "comm": self.comm, "comm_bytes_sent": sent, "comm_allreduce_bytes": ref,
                "comm_ratio": sent / ref if ref else math.nan}


def param_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in ``named_parameters`` order (names included)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _gather_digests(model: torch.nn.Module, device: str) -> list[str]:
    mine = torch.tensor(list(bytes.fromhex(param_digest(model))), dtype=torch.uint8, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [bytes(t.cpu().tolist()).hex() for t in everyone]


def run_ddp(spec: DDPRunSpec, out_dir: str | Path, *, device: str = "cpu", target_loss: float | None = None,
            save_model: bool = False) -> dict[str, Any] | None:
    """Run ``spec`` as this rank of the initialised process group; rank 0 records it and returns the row
    (other ranks return None). A completed run (its run id in ``DIR/results.csv``) is skipped on every rank.

    An exception on rank 0 is recorded as an ``error`` row and re-raised (so torchrun stops the other ranks);
    on other ranks it propagates.
    """
    from studies.store import ResultsStore

    if spec.world_size != dist.get_world_size():
        raise ValueError(f"spec.world_size={spec.world_size} but the process group has {dist.get_world_size()} "
                         f"ranks")
    rank = dist.get_rank()
    store = ResultsStore(out_dir)
    done = torch.tensor([int(rank == 0 and spec.run_id in store.completed())], device=device)
    dist.broadcast(done, 0)
    if int(done):
        if rank == 0:
            print(f"run {spec.run_id} is already in {store.path}; nothing to do", file=sys.stderr)
        dist.barrier()
        return None
    par = DDPParallel(spec.comm, seed=spec.seed, device=device)
    with tempfile.TemporaryDirectory(prefix=f"ddp-rank{rank}-") as scratch:
        # rank 0 writes the run's files; the other ranks' copies (identical but for their data) are discarded
        run_dir = Path(out_dir) / "runs" / spec.run_id if rank == 0 else Path(scratch)
        row = execute_run(spec, out_dir, target_loss=target_loss, debug=rank != 0, parallel=par, run_dir=run_dir)
    if row.get("status") == "error":  # rank 0 only; the others raised
        row.update(par.comm_columns())
        store.append(row)
        raise RuntimeError(f"rank 0 failed: {row['divergence_reason']} (traceback in {run_dir / 'error.txt'})")
    model = par.ddp.module
    digests = _gather_digests(model, device)
    par.ddp = None  # release DDP's reducer before the process group goes away
    if rank == 0:
        from studies.store import write_json_atomic

        row.update(par.comm_columns())
        row["replicas_identical"] = len(set(digests)) == 1
        write_json_atomic(run_dir / "replicas.json", {"param_sha256": digests})
        if save_model:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, run_dir / "model.pt")
        store.append(row)
    dist.barrier()  # every rank leaves together, after rank 0 has recorded the run
    return row if rank == 0 else None


# ----------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="torchrun --nproc_per_node=N -m studies.ddp",
                description="One precision-sweep run, data-parallel over the torchrun processes.")
    p.add_argument("--task", default="gpt", help="task name (see `precision-sweep list`; default gpt)")
    p.add_argument("--size", default="default", help="task size: quick, default or paper")
    p.add_argument("--data", metavar="PATH", help="a text file or nanoGPT uint16 .bin token file (gpt, moe, text)")
    p.add_argument("--optimizer", default="stosignsgd", help="optimizer name (default stosignsgd)")
    p.add_argument("--precision", default="fp32", help="policy preset or policy string (default fp32)")
    p.add_argument("--lr", type=positive_float, help="learning rate (default: the task's for the optimizer)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=positive_int, help="training steps (default: the task's)")
    steps.add_argument("--tokens", type=positive_int, help="training tokens over all ranks")
    p.add_argument("--eval-every", type=positive_int, help="validation every k steps (default: the task's)")
    p.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                   help="divergence threshold override, e.g. spike_factor=5 (repeatable; see studies.config)")
    p.add_argument("--comm", default="fp32", choices=COMMS,
                   help="gradient communication: fp32 all-reduce, 1-bit stochastic signs (sign), or their "
                        "majority vote (sign-majority)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="cpu (gloo) or cuda (nccl, cuda:LOCAL_RANK); default cuda when available")
    p.add_argument("--threads", type=positive_int, help="torch threads per process (default cores / local ranks)")
    p.add_argument("--out", metavar="DIR", default="precision-sweep-results", help="output folder")
    p.add_argument("--save-model", action="store_true", help="rank 0 saves the final state_dict to model.pt")
    p.add_argument("--timeout", type=positive_float, default=600.0, metavar="SECONDS",
                   help="how long a collective waits for a stopped or slow rank before every rank fails "
                        "(default 600, gloo's and nccl's usual 10 minutes)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def spec_from_args(args: argparse.Namespace, world_size: int) -> DDPRunSpec:
    """Validate the options (ValueError naming the valid choices) and build the run's spec."""
    from studies.config import Thresholds
    from studies.optimizers import check_optimizer, default_lr
    from studies.config import parse_precision
    from studies.tasks import get_task

    task = get_task(args.task, size=args.size, data=args.data)
    check_optimizer(args.optimizer)
    parse_precision(args.precision)
    names = {f.name: f.type for f in dataclasses.fields(Thresholds)}
    values: dict[str, float] = {}
    for item in args.threshold:
        name, _, text = item.partition("=")
        if name not in names or not text:
            raise ValueError(f"--threshold {item!r}: expected NAME=VALUE with NAME one of {', '.join(names)}")
        try:
            values[name] = int(text) if names[name] in (int, "int") else float(text)
        except ValueError:
            raise ValueError(f"--threshold {item!r}: {text!r} is not a number") from None
    thresholds = Thresholds(**values).validate()
    lr = args.lr if args.lr is not None else default_lr(task, args.optimizer)
    return DDPRunSpec(task=args.task, optimizer=args.optimizer, precision=args.precision, lr=float(lr),
                      seed=args.seed, phase="ddp", size=args.size, data=args.data, steps=args.steps,
                      tokens=args.tokens, eval_every=args.eval_every, thresholds=dataclasses.asdict(thresholds),
                      world_size=world_size, comm=args.comm)


def _print_row(row: dict[str, Any], out: str) -> None:
    keys = ("run_id", "status", "steps_done", "tokens", "final_loss", "best_val_loss", "diverged",
            "divergence_reason", "wall_s", "world_size", "comm", "comm_bytes_sent", "comm_allreduce_bytes",
            "comm_ratio", "replicas_identical")
    print(json.dumps({k: row.get(k) for k in keys}, default=str))
    print(f"results in {Path(out) / 'results.csv'}; metrics in {Path(out) / 'runs' / row['run_id'] / 'metrics.csv'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (every torchrun process runs it). Exit status 2 on bad options, 1 on a failed run."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        sys.stderr.write(f"studies.ddp: error: {', '.join(missing)} not set; launch with "
                         f"`torchrun --nproc_per_node=N -m studies.ddp ...`\n")
        return 2
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    try:
        spec = spec_from_args(args, world)
    except (ValueError, TypeError) as e:
        if args.debug:
            raise
        sys.stderr.write(f"studies.ddp: error: {' '.join(str(e).split())}\n")
        return 2
    use_cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        sys.stderr.write("studies.ddp: error: --device cuda but CUDA is not available; valid here: cpu\n")
        return 2
    device = f"cuda:{local_rank}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // max(1, local_world)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    try:
        row = run_ddp(spec, args.out, device=device, save_model=args.save_model)
        if row is not None:
            _print_row(row, args.out)
    except RUN_FAILURES as e:  # a failed run (rank 0's error row is written); anything else is a bug
        if args.debug or dist.get_rank() != 0:
            raise
        sys.stderr.write(f"studies.ddp: error: {' '.join(str(e).split())}\n")
        return 1
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
