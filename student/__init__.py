"""The student stage: the golf GPT family, Muon, the Accelerate training loop, checkpoints."""

from __future__ import annotations


def load_checkpoint(path, device: str = "cpu"):
    """A float checkpoint directory -> torch.nn.Module in eval mode (see student/checkpoint.py)."""
    from student.checkpoint import load_checkpoint as _load

    return _load(path, device=device)


__all__ = ["load_checkpoint"]
