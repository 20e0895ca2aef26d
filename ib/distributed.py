"""Collectives the checkpoint state needs: every rank's own piece, gathered where rank 0 writes the file."""
import torch.distributed as dist


def gather_from_ranks(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] without a process group. Every rank must call it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]
