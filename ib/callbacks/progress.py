"""Training progress counted in optimizer steps: a bar on a terminal, plain lines in a log file.

Lightning's bars count batches per epoch, and the training stream is an IterableDataset of unknown length
whose "epochs" are a bookkeeping unit (data.batches_per_epoch), so its totals came out wrong ("Epoch 2/-2",
"50/30"), and written to a file (`ib fit > log.txt`, SLURM) a bar is a wall of redraws. During fit this takes
its place (Lightning's bar is disabled through its public `disable()`; validate keeps it):
- stdout is a terminal: one bar over the run's steps, step/max_steps, ETA, the progress-bar metrics;
- otherwise: every `every_n_steps` steps one line: step/total, epoch, the progress-bar metrics (train/loss),
  samples/s, elapsed, ETA; one line after each validation with its metrics and duration, one at the end.
samples/s is since the previous line, validations left out; the ETA is over wall time since the first step,
validations included.
With `--trainer.enable_progress_bar false` there is no bar, and the lines are still written.
"""
import math
import sys
import time
import warnings
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ib.errors import ConfigError


def _batch_size(batch) -> int:
    if isinstance(batch, dict):
        batch = next((v for v in batch.values() if isinstance(v, torch.Tensor)), next(iter(batch.values())))
    return batch.shape[0] if isinstance(batch, torch.Tensor) else len(batch)


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


def _metrics(values: dict, validation: bool) -> str:
    items = [(k, v) for k, v in sorted(values.items()) if k.startswith("val") == validation]
    return "  ".join(f"{k} {float(v):.4g}" for k, v in items)


class TrainProgress(L.Callback):
    """
    every_n_steps: optimizer steps between two lines when stdout is not a terminal.
    bar: a bar (true) or lines (false); null: a bar when stdout is a terminal and the trainer's progress bar is on.
    """

    def __init__(self, every_n_steps: int = 50, bar: bool | None = None):
        if every_n_steps < 1:
            raise ConfigError(f"TrainProgress.every_n_steps: must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.bar_wanted = every_n_steps, bar
        self._bar = None
        # Lightning's Trainer advertises its cloud logger on every run (an INFO record, not a warning);
        # noise in a training log.
        _drop_log_record("lightning.pytorch.utilities.rank_zero", "💡 Tip:")
        # Lightning 2.6 builds a torch LeafSpec to flatten the dataloaders, which torch >= 2.10 deprecates;
        # nothing to act on here.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        lightning_bar = trainer.progress_bar_callback
        if lightning_bar is not None:
            lightning_bar.disable()
        self.use_bar = self.bar_wanted if self.bar_wanted is not None else (
            lightning_bar is not None and sys.stdout.isatty())

    # --- bookkeeping --------------------------------------------------------------------------------------
    @rank_zero_only
    def on_train_start(self, trainer, pl_module):
        self.total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.start_step = self.printed_step = trainer.global_step
        self.samples, self.train_time = 0, 0.0  # since the previous line
        self.first_step_end: tuple[float, int] | None = None  # (time, step) after the first step of this process
        self.t_last = self.t_start = time.monotonic()  # the previous batch end, or the end of a validation
        if self.use_bar:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self.total, initial=self.start_step, unit="step", desc="train",
                             dynamic_ncols=True, file=sys.stdout, smoothing=0.1)
        else:
            resumed = f", resuming at step {self.start_step}" if self.start_step else ""
            self._print(f"training to step {self.total or '?'}{resumed}: a line every {self.every_n_steps} steps")

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.monotonic()
        self.train_time += now - self.t_last  # data loading included
        self.t_last = now
        self.samples += _batch_size(batch) * trainer.world_size
        step = trainer.global_step
        if self.first_step_end is None and step > self.start_step:
            self.first_step_end = (now, step)
        if self.use_bar:
            if self._bar is None:
                return
            self._bar.set_postfix_str(f"epoch {trainer.current_epoch}  "
                                      f"{_metrics(trainer.progress_bar_metrics, False)}", refresh=False)
            self._bar.update(step - self._bar.n)
            if self.total and step >= self.total:  # before Lightning's "`Trainer.fit` stopped" line
                self._bar.close()
                self._bar = None
        elif step != self.printed_step and step % self.every_n_steps == 0:
            self._step_line(trainer, now)

    @rank_zero_only
    def on_validation_start(self, trainer, pl_module):
        self.t_val = time.monotonic()
        if self._bar is not None and not trainer.sanity_checking:
            self._bar.set_description("validating")

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not hasattr(self, "t_val"):
            return
        self.t_last = time.monotonic()
        seconds = self.t_last - self.t_val
        line = (f"validation at step {trainer.global_step} ({seconds:.1f} s): "
                f"{_metrics(trainer.callback_metrics, True)}")
        if self._bar is not None:
            self._bar.set_description("train")
            self._bar.write(line, file=sys.stdout)
        else:
            self._print(line)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif not self.use_bar and trainer.global_step != self.printed_step:
            self._step_line(trainer, time.monotonic())

    @rank_zero_only
    def on_exception(self, trainer, pl_module, exception):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # --- lines --------------------------------------------------------------------------------------------
    def _step_line(self, trainer, now: float) -> None:
        step, self.printed_step = trainer.global_step, trainer.global_step
        of = f"/{self.total} ({100 * step / self.total:.0f}%)" if self.total else ""
        rate = self.samples / self.train_time if self.train_time > 0 else float("nan")
        eta = float("nan")
        if self.total and self.first_step_end and step > self.first_step_end[1]:
            t0, s0 = self.first_step_end
            eta = (self.total - step) * (now - t0) / (step - s0)
        self._print(f"step {step}{of}  epoch {trainer.current_epoch}  "
                    f"{_metrics(trainer.progress_bar_metrics, False)}  {rate:.1f} samples/s  "
                    f"elapsed {_duration(now - self.t_start)}  ETA {_duration(eta)}")
        self.samples, self.train_time = 0, 0.0

    @staticmethod
    def _print(line: str) -> None:
        print(line, file=sys.stdout, flush=True)


class _DropPrefix:
    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _drop_log_record(logger_name: str, prefix: str) -> None:
    import logging

    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_DropPrefix(prefix))
