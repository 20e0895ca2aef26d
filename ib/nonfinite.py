"""The NaN / inf guard: a step with a non-finite loss is skipped, counted, and too many in a row stop the run.

The check looks at the gradients just before the optimizer step: a non-finite loss always makes them
non-finite, and under DDP they have been all-reduced by then, so every rank sees the same verdict and skips
the same steps without another collective (skipping on one rank only would desynchronise the weights).
Skipping = dropping the gradients, so AdamW leaves parameters and moments untouched (the LR schedule and the
step counter still advance: the bad batch is consumed, not retried).
"""
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ib.errors import NonFiniteLossError


def gradients_finite(params: list[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


class NonFiniteGuard:
    """max_consecutive: this many skipped steps in a row end training (config: model.max_nonfinite_steps)."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.total = 0        # skipped steps in the whole run (saved in checkpoints)
        self.consecutive = 0  # a resumed run starts a fresh streak

    def check(self, optimizer: torch.optim.Optimizer, step: int) -> bool:
        """-> True when the step may proceed; otherwise drops the gradients, or raises after too many."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradients_finite(params):
            self.consecutive = 0
            return True
        for p in params:
            p.grad = None
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"model.max_nonfinite_steps: {self.consecutive} consecutive steps with a non-finite loss "
                f"(steps {step - self.consecutive + 1}..{step}); training stopped, last.ckpt holds the last good "
                "weights")
        rank_zero_warn(f"step {step}: non-finite loss or gradients, optimizer step skipped "
                       f"({self.consecutive} in a row, {self.total} in total)")
        return False
