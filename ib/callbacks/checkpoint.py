"""Lightning's ModelCheckpoint, plus last.ckpt wherever a run can stop: the final step, preemption, the NaN guard.

Stock ModelCheckpoint skips last.ckpt at train end once any last.ckpt was written in the run, so with
`every_n_train_steps` the final steps would be lost and a requeued job would redo them.
Preemption (SIGTERM, or the cluster's early warning; see ib.preemption) stops every rank after the same
step with Lightning's SIGTERMException; that state, and the one the NaN guard stops at, is saved as
last.ckpt, which `--ckpt_path last` resumes from. Other exceptions can come from the middle of a step, so
they leave the last periodic checkpoint alone.
At the start it removes temp files of saves that a killed job left (SafeCheckpointIO writes through one), and
a resumed run replaces the folder's own last.ckpt even when the folder was moved since it was written.
"""
import os

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ib.atomic_write import remove_stale_temp_files
from ib.errors import NonFiniteLossError
from ib.preemption import StopSignals, requeue_slurm_job


class RunCheckpoint(ModelCheckpoint):
    """
    requeue_signal: the signal a cluster sends ahead of a kill (SLURM: `#SBATCH --signal=USR1@120`): handled
        like SIGTERM, then the SLURM job is requeued; null leaves that signal alone.
    Other arguments: ModelCheckpoint's.
    """

    def __init__(self, *args, requeue_signal: str | None = "SIGUSR1", **kwargs):
        super().__init__(*args, **kwargs)
        self.signals = StopSignals(requeue_signal)

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero and self.dirpath and "://" not in str(self.dirpath):
            for p in remove_stale_temp_files(self.dirpath, self.FILE_EXTENSION):
                rank_zero_warn(f"removed {p}, left by a checkpoint save that was killed")

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # Stock ModelCheckpoint forgets last_model_path when the folder moved (a copy, another mount point) and
        # then writes last-v1.ckpt beside a stale last.ckpt. The run resumed from this folder's last.ckpt.
        if self.dirpath and self.save_last:
            self.last_model_path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def on_train_start(self, trainer, pl_module):
        self.signals.install()  # after Lightning registered its handlers: these replace them during training

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.signals.stop_everywhere(trainer):
            raise SIGTERMException()

    def on_train_end(self, trainer, pl_module):
        self.signals.uninstall()
        self._save_last_if_new(trainer)
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self.signals.uninstall()
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, (SIGTERMException, NonFiniteLossError)) and not trainer.sanity_checking:
            self._save_last_if_new(trainer)
            rank_zero_info(f"stopped at step {trainer.global_step} ({type(exception).__name__}), "
                           f"saved {self.last_model_path}")
        if isinstance(exception, SIGTERMException) and self.signals.requeue_requested and trainer.is_global_zero:
            requeue_slurm_job()  # only now that the checkpoint is on disk

    def _save_last_if_new(self, trainer) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step
