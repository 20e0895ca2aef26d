"""Test-only callbacks, referenced by class_path from test configs (so they also run in CLI subprocesses)."""
import json
import os
from pathlib import Path

import lightning as L
import torch


def trainable_state(pl_module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in pl_module.model.trainable_state_dict().items()}


class StepMarker(L.Callback):
    """Writes the global step after every training step (rank 0), so a test can tell that training is under way."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_end(self, trainer, *args):
        if not trainer.is_global_zero:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(trainer.global_step))
        tmp.replace(self.path)


class InjectNaN(L.Callback):
    """Fills the images of the batches of the given (1-based) steps with NaN, on one rank or on all."""

    def __init__(self, at_steps: list[int], rank: int | None = None):
        self.at_steps, self.rank = set(at_steps), rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 in self.at_steps and self.rank in (None, trainer.global_rank):
            batch["image"].fill_(float("nan"))


class RankReport(L.Callback):
    """Per rank: concepts seen per step, a checksum of the trainable weights after each step, local and
    synced validation losses, final weights. Written to out_dir/rank{r}.json and rank{r}.pt when training
    ends or stops."""

    def __init__(self, out_dir: str):
        self.out = Path(out_dir)
        self.report = {"concepts": [], "checksums": [], "val_local": [], "val_synced": [], "nonfinite": None}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.report["concepts"].append(list(batch["concept"]))

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.report["checksums"].append(sum(float(v.double().sum()) for v in trainable_state(pl_module).values()))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.report["val_local"].append(float(outputs))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.report["val_synced"].append(float(trainer.callback_metrics["val/loss_own"]))

    def on_train_end(self, trainer, pl_module):
        self._write(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self.report["exception"] = type(exception).__name__
        self._write(trainer, pl_module)

    def _write(self, trainer, pl_module):
        self.report["nonfinite"] = pl_module.nonfinite.total
        self.report["pid"] = os.getpid()
        self.out.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        (self.out / f"rank{rank}.json").write_text(json.dumps(self.report))
        torch.save(trainable_state(pl_module), self.out / f"rank{rank}.pt")


class KeyRecorder(L.Callback):
    """Appends each finished training step's sample keys to a JSON-lines file (every rank: `path` + rank)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.keys: list[str] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys = list(batch["key"])

    def on_train_batch_end(self, trainer, *args):
        path = self.path.with_name(f"{self.path.name}{trainer.global_rank}")
        with path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "keys": self.keys}) + "\n")


class WeightsEveryStep(L.Callback):
    """Saves the trainable weights after every training step (rank 0) to out_dir/step{N}.pt."""

    def __init__(self, out_dir: str):
        self.out = Path(out_dir)

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.is_global_zero:
            self.out.mkdir(parents=True, exist_ok=True)
            torch.save(trainable_state(pl_module), self.out / f"step{trainer.global_step}.pt")
