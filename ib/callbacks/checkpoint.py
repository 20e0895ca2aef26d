"""Lightning's ModelCheckpoint, plus last.ckpt wherever a run can stop: the final step and the NaN guard.

Stock ModelCheckpoint skips last.ckpt at train end once any last.ckpt was written in the run, so with
`every_n_train_steps` the final steps would be lost and a requeued job would redo them. The NaN guard stops
training with NonFiniteLossError before the bad step's optimizer update, so last.ckpt holds the last good
weights. Preemption (ib/callbacks/preemption.py) writes last.ckpt through `save_last` below. Other
exceptions can come from the middle of a step, so they leave the last periodic checkpoint alone.
At the start it removes temp files of saves that a killed job left (SafeCheckpointIO writes through one), and
a resumed run replaces the folder's own last.ckpt even when the folder was moved since it was written.
Only public Lightning APIs: saves go through `trainer.save_checkpoint`, as ModelCheckpoint's own do.
"""
import os
import warnings

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ib.atomic_write import remove_stale_temp_files
from ib.errors import NonFiniteLossError


def save_last(trainer) -> str | None:
    """Writes the last.ckpt of the trainer's first ModelCheckpoint that keeps one, now (collective: call it on
    every rank); None when there is none."""
    cb = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.save_last
               and c.dirpath), None)
    if cb is None:
        return None
    path = os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
    cb.last_model_path = path  # before the save: it is part of the callback's state in the file
    trainer.save_checkpoint(path, weights_only=cb.save_weights_only)
    return path


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint's arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._saved_at_step: int | None = None  # global step of the last save in this process
        self._found_files = False
        # `ib fit --ckpt_path last` (make train) starts a run as well as resuming one; on the first run there is
        # no last.ckpt yet, and Lightning's warning about it suggests save_last=True, which is set.
        warnings.filterwarnings("ignore", message=r'.*ckpt_path="last"\) is set, but there is no last checkpoint')

    def setup(self, trainer, pl_module, stage):
        # Lightning warns about a non-empty folder here, before it knows whether the run resumes from it, which
        # is what a requeued run does every time; on_train_start warns when the run does not resume.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        self._found_files = False
        if stage == "fit" and trainer.is_global_zero and self.dirpath and "://" not in str(self.dirpath):
            for p in remove_stale_temp_files(self.dirpath, self.FILE_EXTENSION):
                rank_zero_warn(f"removed {p}, left by a checkpoint save that was killed")
            self._found_files = os.path.isdir(self.dirpath) and any(os.scandir(self.dirpath))

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        if self._found_files and not trainer.ckpt_path:
            rank_zero_warn(f"{self.dirpath} holds checkpoints of an earlier run and this one does not resume from "
                           "them (--ckpt_path last would); files of the same name get replaced")

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # Stock ModelCheckpoint forgets last_model_path when the folder moved (a copy, another mount point) and
        # then writes last-v1.ckpt beside a stale last.ckpt. The run resumed from this folder's last.ckpt.
        if self.dirpath and self.save_last:
            self.last_model_path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # Every save of this run (periodic ones write last.ckpt too) passes here, whoever asked for it.
        self._saved_at_step = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        if self._saved_at_step != trainer.global_step:
            save_last(trainer)

    def on_exception(self, trainer, pl_module, exception):
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, NonFiniteLossError) and not trainer.sanity_checking \
                and self._saved_at_step != trainer.global_step:
            path = save_last(trainer)
            if path:
                rank_zero_info(f"stopped at step {trainer.global_step} by the NaN guard, saved {path}")
