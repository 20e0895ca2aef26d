"""Logs the module's `log_images(batch)` grids to TensorBoard (and as PNG) on the first validation batch."""
from pathlib import Path

import lightning as L
import torch.nn.functional as F
from torchvision.utils import save_image

from ib.models.sampler import output_size


class ImageLogger(L.Callback):
    def __init__(self, max_images: int = 4, save_png: bool = True):
        self.max_images, self.save_png = max_images, save_png
        self.png_dir: Path | None = None

    def setup(self, trainer, pl_module, stage):
        # trainer.log_dir is a broadcast under DDP: ask on every rank here, not on rank 0 alone (that hangs).
        self.png_dir = Path(trainer.log_dir) / "images" if self.save_png and trainer.log_dir else None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        # Validation samples at the sampler's size (as `ib generate` does with these weights), which need not
        # be data.image_size (training at another resolution is fine): the targets are shown at that size.
        size = output_size(pl_module.model, pl_module.sampling)
        if tuple(batch["image"].shape[-2:]) != size:
            batch = dict(batch, image=F.interpolate(batch["image"].float(), size=size, mode="bilinear", antialias=True))
        grids = pl_module.log_images(batch, max_images=self.max_images)
        step = trainer.global_step
        for name, grid in grids.items():
            for logger in trainer.loggers:
                if hasattr(logger.experiment, "add_image"):
                    logger.experiment.add_image(f"val/{name}", grid, step)
            if self.png_dir:
                out = self.png_dir / f"{name}_step{step:07d}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                save_image(grid, out)
