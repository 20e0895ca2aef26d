"""Logs the module's `log_images(batch)` grids to TensorBoard (and as PNG) on the first validation batch."""
from pathlib import Path

import lightning as L
from torchvision.utils import save_image


class ImageLogger(L.Callback):
    def __init__(self, max_images: int = 4, save_png: bool = True):
        self.max_images, self.save_png = max_images, save_png

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        grids = pl_module.log_images(batch, max_images=self.max_images)
        step = trainer.global_step
        for name, grid in grids.items():
            for logger in trainer.loggers:
                if hasattr(logger.experiment, "add_image"):
                    logger.experiment.add_image(f"val/{name}", grid, step)
            # Not trainer.log_dir: under DDP it broadcasts, and only rank 0 gets here (a deadlock).
            log_dir = getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir
            if self.save_png and log_dir:
                out = Path(log_dir) / "images" / f"{name}_step{step:07d}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                save_image(grid, out)
