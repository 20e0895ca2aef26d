"""Lightning's ModelCheckpoint, plus a last.ckpt at the final step.

Stock ModelCheckpoint skips last.ckpt at train end once any last.ckpt was written in the run, so with
`every_n_train_steps` the final steps would be lost and a requeued job would redo them.
"""
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    def on_train_end(self, trainer, pl_module):
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step
        super().on_train_end(trainer, pl_module)
