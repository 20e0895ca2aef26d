"""Every rank's RNG state (torch, CUDA, numpy, python) in the checkpoint, restored when training resumes.

Lightning restores weights, optimizer, schedulers and loop counters but not random generators, so a resumed
run would draw different noise, timesteps and condition dropout than the interrupted one would have.
Under DDP each rank also gets its own stream (seed + rank): `seed_everything` gives every process the same
seed, which would draw the same diffusion noise and timesteps on every rank for different images.
The data stream (WebDataset shuffling, augmentation) has its own seeds; where it stands is in the DataModule's
state (ib/data/datamodule.py).
"""
import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ib.distributed import gather_from_ranks


def collect_rng_state() -> dict:
    """This process's generators, as tensors and plain values (checkpoints load with weights_only=True)."""
    key, pos, has_gauss, gauss = np.random.get_state()[1:]
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def apply_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class RNGState(L.Callback):
    def __init__(self):
        self._restored: list[dict] | None = None

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and trainer.world_size > 1:
            _seed_all(torch.initial_seed() + trainer.global_rank)

    def state_dict(self) -> dict:
        # Called on every rank when a checkpoint is made (Lightning's save is collective already).
        return {"per_rank": gather_from_ranks(collect_rng_state())}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict["per_rank"]

    def on_train_start(self, trainer, pl_module):
        # Applied here, not at load time: building the dataloaders between the two draws from the generators.
        if self._restored is None:
            return
        if len(self._restored) == trainer.world_size:
            apply_rng_state(self._restored[trainer.global_rank])
        else:
            rank_zero_warn(f"RNG state saved by {len(self._restored)} ranks, resuming on {trainer.world_size}: "
                           "generators start fresh")
        self._restored = None
