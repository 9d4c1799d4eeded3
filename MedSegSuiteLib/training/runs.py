"""Unfinished finetuning runs in the user model folder (no torch needed, so the panel can ask)."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["finetune_base", "pending_finetune_runs"]

WORKDIR_SUFFIX = ".training"


def finetune_base(parent_id: str) -> str:
    """The id finetuned models of ``parent_id`` are numbered from (``a-ft-2`` -> ``a``)."""
    return re.sub(r"-ft-\d+$", "", parent_id)


def pending_finetune_runs(user_dir: Path, parent_id: str) -> list[Path]:
    """Work folders ``<base>-ft-<n>.training`` holding a checkpoint, oldest first by checkpoint time.

    A work folder whose model folder already exists belongs to a run that finished but was
    stopped before it could remove its work folder; it is not resumable and is left out.
    """
    try:
        checkpoints = list(Path(user_dir).glob(f"{finetune_base(parent_id)}-ft-*{WORKDIR_SUFFIX}/checkpoint.pt"))
        pending = [
            c.parent for c in checkpoints if not (c.parent.parent / c.parent.name[: -len(WORKDIR_SUFFIX)]).exists()
        ]
        return sorted(pending, key=lambda folder: (folder / "checkpoint.pt").stat().st_mtime)
    except OSError:
        return []
