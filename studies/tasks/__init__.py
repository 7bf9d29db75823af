"""Built-in tasks of the precision sweep: small models on embedded data, deterministic on CPU given a seed.

A :class:`Task` is a recipe (name, sizes, step count, learning rates); ``Task.build(seed)`` makes a
:class:`TaskRun` — a fresh model plus its data — whose ``train_loss(step)`` is the differentiable loss on training
batch ``step`` and ``val_loss()`` the loss on a fixed validation set.

Tasks (``get_task(name, size=..., data=...)``):

- ``convex-l1``: a non-smooth convex problem, ``f(x) = ‖Ax − b‖₁ / n_blocks`` with ``A`` block diagonal, built so
  that deterministic SignSGD provably stalls while StoSignSGD converges (see :class:`L1Objective`). Optimum 0.
- ``mlp``: a ReLU MLP classifying synthetic inputs labelled by a fixed random teacher network.
- ``gpt``: a tiny nanoGPT-style character-level transformer on the CPython documentation text shipped with
  Python (``pydoc_data.topics``): the default language-model task.
- ``moe``: the same transformer with each MLP replaced by top-k routed experts (softmax router, Switch-style
  load-balancing auxiliary loss) — the non-smooth routing the StoSignSGD paper names.
- ``text``: the GPT on the user's data (``data=PATH``): a text file (byte-level, vocabulary 256), a
  nanoGPT-style uint16 ``.bin`` token file, or a directory holding nanoGPT's ``train.bin`` and ``val.bin``.
  ``gpt`` and ``moe`` accept ``data=PATH`` too.

Every matrix multiply with learned weights is an ``nn.Linear`` (the precision layer ``lowprec.nn.convert`` swaps
those for quantized layers); ``nn.Embedding`` and ``nn.LayerNorm`` stay in full precision, and so do the attention
score and attention-times-value matmuls (plain ``@`` on activations, no fused ``scaled_dot_product_attention``).

Determinism: the problem data (teacher, convex instance, text split, validation windows) is fixed per task and
identical for every seed, so runs are compared on the same validation set; the seed fixes the model
initialisation and the order of training batches (batch ``step`` is drawn from a generator seeded by
``(seed, step)``, so it does not depend on what was computed before).

Layout: ``base`` (Task, TaskRun, seeds, sizes), ``convex``, ``mlp``, ``lm`` (one file per task family, each with
its sizes, learning rates and recipe function), ``corpus`` (language-model data); ``REGISTRY`` maps a task name
to its family's recipe function.
"""
from __future__ import annotations

from typing import Callable

from studies.tasks.base import DATA_SEED, SIZES, TRAIN_FRACTION, Task, TaskRun
from studies.tasks.convex import L1Objective, convex_task, l1_problem
from studies.tasks.corpus import Corpus, load_corpus, pydoc_corpus, pydoc_text
from studies.tasks.lm import GPT, MoE, lm_task
from studies.tasks.mlp import MLP, mlp_task

__all__ = ["TASKS", "REGISTRY", "DATA_TASKS", "SIZES", "DATA_SEED", "TRAIN_FRACTION", "Task", "TaskRun",
           "get_task", "Corpus", "load_corpus", "pydoc_corpus", "pydoc_text", "GPT", "MoE", "MLP", "L1Objective",
           "l1_problem"]

TASKS: dict[str, str] = {
    "convex-l1": "non-smooth convex ‖Ax−b‖₁ (block kinks): deterministic SignSGD provably stalls, optimum 0",
    "convex-l1-weak": "convex-l1 with kink strength 0.02, below (1-beta)/(1+beta): Signum stalls like SignSGD",
    "mlp": "ReLU MLP on Gaussian inputs labelled by a fixed random teacher network (10 classes)",
    "gpt": "tiny nanoGPT-style char-level transformer on Python's pydoc_data.topics (default LM task)",
    "moe": "tiny mixture-of-experts transformer (softmax router, top-k experts, balancing loss) on the same text",
    "text": "the tiny GPT on your data=PATH (text file as bytes, uint16 .bin tokens, or a train.bin/val.bin dir)",
}
# task name -> recipe function (name, description, size, data) -> Task
REGISTRY: dict[str, Callable[[str, str, str, "str | None"], Task]] = {
    "convex-l1": convex_task, "convex-l1-weak": convex_task, "mlp": mlp_task, "gpt": lm_task, "moe": lm_task,
    "text": lm_task,
}
DATA_TASKS = ("gpt", "moe", "text")


def get_task(name: str, *, size: str = "default", data: str | None = None) -> Task:
    """The task ``name`` at ``size`` ("quick" | "default" | "paper"); ``data=PATH`` for gpt, moe and text.

    Unknown names, sizes or unusable data raise ``ValueError`` naming the valid choices.
    """
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    if data is not None and name not in DATA_TASKS:
        raise ValueError(f"task {name!r} uses embedded data; data=PATH applies only to {', '.join(DATA_TASKS)}")
    if name == "text" and data is None:
        raise ValueError("task 'text' needs data=PATH (a text file, a uint16 .bin token file, "
                         "or a directory with train.bin and val.bin)")
    return REGISTRY[name](name, TASKS[name], size, data)
