"""Preemption: SIGTERM or the cluster's early warning stops every rank after the same step, writes last.ckpt
there, and with the early warning requeues the SLURM job once the file is on disk.

The signal handlers only set a flag (ib/preemption.py says why Lightning's own are replaced); after every
training step the ranks agree whether any has one and then all raise Lightning's SIGTERMException, which
`ib fit` turns into exit 143. last.ckpt goes where the run's ModelCheckpoint keeps it, so `--ckpt_path last`
resumes from it. It is a Lightning `Checkpoint` (it writes one), so Lightning runs it after the other callbacks
and, listed after the ModelCheckpoint, after that one too: the step it stops after is complete for every
callback (periodic checkpoint included), as in an uninterrupted run.
"""
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ib.callbacks.checkpoint import save_last
from ib.preemption import StopSignals, requeue_slurm_job


class Preemption(Checkpoint):
    """
    requeue_signal: the signal a cluster sends ahead of a kill (SLURM: `#SBATCH --signal=USR1@120`): handled
        like SIGTERM, then the SLURM job is requeued; null leaves that signal alone.
    """

    def __init__(self, requeue_signal: str | None = "SIGUSR1"):
        self.signals = StopSignals(requeue_signal)
        self._saved_at_step: int | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._saved_at_step = trainer.global_step  # every save passes here, the periodic ones too

    def on_train_start(self, trainer, pl_module):
        self.signals.install()  # after Lightning registered its handlers: these replace them during training

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.signals.stop_everywhere(trainer):
            raise SIGTERMException()

    def on_train_end(self, trainer, pl_module):
        self.signals.uninstall()

    def on_exception(self, trainer, pl_module, exception):
        self.signals.uninstall()
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        if self._saved_at_step == trainer.global_step or save_last(trainer):
            rank_zero_info(f"stopped at step {trainer.global_step} by a stop signal, last.ckpt saved")
        else:
            rank_zero_warn("stopped by a stop signal, but no ModelCheckpoint with save_last keeps a last.ckpt")
        if self.signals.requeue_requested and trainer.is_global_zero:
            requeue_slurm_job()  # only now that the checkpoint is on disk
