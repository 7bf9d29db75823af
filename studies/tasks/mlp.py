"""mlp: a ReLU MLP classifying Gaussian inputs labelled by a fixed random teacher network."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from studies.tasks.base import DATA_SEED, Task, TaskRun, check_step, sized_task, step_seed

__all__ = ["teacher_data", "MLP", "ClassifierRun", "build_mlp", "mlp_task", "MLP_SIZES", "MLP_LRS"]

def teacher_data(n: int, in_dim: int, classes: int, teacher_hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Gaussian inputs labelled by the argmax of a fixed random ReLU teacher MLP (from ``DATA_SEED``)."""
    g = torch.Generator().manual_seed(DATA_SEED)
    W1 = torch.randn(in_dim, teacher_hidden, generator=g) / math.sqrt(in_dim)
    W2 = torch.randn(teacher_hidden, classes, generator=g) / math.sqrt(teacher_hidden)
    x = torch.randn(n, in_dim, generator=g)
    y = (torch.relu(x @ W1) @ W2).argmax(1)
    return x, y


class MLP(nn.Module):
    """ReLU MLP: Linear → ReLU → … → Linear (logits)."""

    def __init__(self, in_dim: int, hidden: int, depth: int, classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ClassifierRun(TaskRun):
    """Minibatch cross-entropy; batch ``step`` is a sample without replacement drawn from ``(seed, step)``."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_train: int, batch: int, seed: int):
        self.model = model
        self.x_train, self.y_train = x[:n_train], y[:n_train]
        self.x_val, self.y_val = x[n_train:], y[n_train:]
        self.batch, self.seed = batch, seed
        self.tokens_per_step = batch
        self.optimal_loss = None

    def batch_indices(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step_seed(self.seed, check_step(step)))
        return torch.randperm(len(self.x_train), generator=g)[:self.batch]

    def train_loss(self, step: int) -> torch.Tensor:
        idx = self.batch_indices(step).to(self.x_train.device)
        return F.cross_entropy(self.model(self.x_train[idx]), self.y_train[idx])

    @torch.no_grad()
    def val_loss(self) -> float:
        was = self.model.training
        self.model.eval()
        try:
            return float(F.cross_entropy(self.model(self.x_val), self.y_val))
        finally:
            self.model.train(was)


def build_mlp(*, seed: int, device: torch.device, in_dim: int, classes: int, teacher_hidden: int, hidden: int,
               depth: int, n_train: int, n_val: int, batch: int) -> ClassifierRun:
    x, y = teacher_data(n_train + n_val, in_dim, classes, teacher_hidden)
    model = MLP(in_dim, hidden, depth, classes).to(device)     # torch's default init under manual_seed(seed)
    return ClassifierRun(model, x.to(device), y.to(device), n_train, batch, seed)


MLP_SIZES = {
    "quick": dict(hidden=64, depth=2, batch=64, n_train=4096, steps=100, eval_every=20),
    "default": dict(hidden=128, depth=2, batch=128, n_train=8192, steps=500, eval_every=25),
    "paper": dict(hidden=512, depth=4, batch=256, n_train=65536, steps=5000, eval_every=250),
}
MLP_LRS = {
    "quick": {"adamw": 1e-2, "sgd": 3e-1, "signsgd": 1e-2, "signum": 1e-2, "lion": 1e-2, "stosignsgd": 1e-2},
    "default": {"adamw": 3e-3, "sgd": 1e-1, "signsgd": 3e-3, "signum": 3e-3, "lion": 3e-3, "stosignsgd": 3e-3},
    "paper": {"adamw": 1e-3, "sgd": 3e-2, "signsgd": 1e-3, "signum": 1e-3, "lion": 1e-3, "stosignsgd": 1e-3},
}


def mlp_task(name: str, description: str, size: str, data: str | None) -> Task:
    """The mlp recipe at ``size`` (embedded teacher data; ``data`` must be None, checked by the registry)."""
    c = dict(MLP_SIZES[size], in_dim=32, classes=10, teacher_hidden=64, n_val=2048)
    return sized_task(name, description, size, c, MLP_LRS[size], c["batch"], build_mlp)
