"""Training checkpoints: everything a killed run needs to continue as if it had never stopped.

A checkpoint holds the student, the distillation heads (projectors, feature
statistics), optimizer, scheduler, EMA, the data position (epoch, step within
it) and the RNG states. Files are written atomically (temp file, then rename),
read back with ``weights_only=True``, and only the newest few are kept.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step-(\d{9})\.pt$")
KEEP = 2


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:09d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(run_dir)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RunCheckpointer:
    """Saves and restores one worker's training state: rank 0 writes, every rank resumes its own RNG.

    ``parts`` are the objects with ``state_dict``/``load_state_dict`` (module, optimizer, scheduler,
    EMA or None); the data position travels beside them, as a plain dict.
    """

    def __init__(self, run_dir: str | Path, parts: dict[str, Any], generator: torch.Generator, rank: int,
                 world_size: int):
        self.run_dir, self.parts, self.generator = run_dir, parts, generator
        self.rank, self.world_size = rank, world_size

    def save(self, step: int, position: dict[str, int]) -> None:
        import torch.distributed as dist

        rngs = [rng_state(self.generator)]
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if self.rank == 0:
            state = {name: part.state_dict() if part is not None else None for name, part in self.parts.items()}
            save_checkpoint(self.run_dir, step, {**state, "position": dict(position), "rng": rngs})
        if self.world_size > 1:
            dist.barrier()

    def restore(self) -> dict[str, int] | None:
        """Load the newest checkpoint into the parts; returns its position (None without a checkpoint)."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return None
        state = load_checkpoint(path)
        for name, part in self.parts.items():
            if part is not None:
                part.load_state_dict(state[name])
        restore_rng_state(state["rng"][self.rank], self.generator)
        return state["position"]
