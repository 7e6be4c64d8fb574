"""Training checkpoints: everything a killed run needs to continue as if it had never stopped.

A checkpoint holds the student, the distillation heads (projectors, feature
statistics), optimizer, scheduler, EMA, the data position (epoch, step within
it) and the RNG states. The run directory may be local or on object storage, so a
checkpoint is committed in two writes, each whole and atomic on both:
``checkpoints/step-N.pt``, then a small marker ``step-N.commit`` (JSON: step, bytes,
sha256). Only a checkpoint whose marker exists and matches its file is ever loaded;
a file without one (a writer killed mid-upload, a store that lost the last write)
is skipped for the previous checkpoint. Pruning deletes a marker before its file.
Checkpoints are read with ``weights_only=True`` and only the newest few are kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from typing import Any

import torch

from pipeline.data import storage

_FILE = re.compile(r"^step-(\d{9})\.pt$")
_MARKER = re.compile(r"^step-(\d{9})\.commit$")
KEEP = 2


def checkpoint_dir(run_dir: str) -> str:
    return storage.join(str(run_dir), "checkpoints")


def checkpoint_path(run_dir: str, step: int) -> str:
    return storage.join(checkpoint_dir(run_dir), f"step-{step:09d}.pt")


def marker_path(run_dir: str, step: int) -> str:
    return storage.join(checkpoint_dir(run_dir), f"step-{step:09d}.commit")


def committed_steps(run_dir: str) -> list[int]:
    """Steps that have a commit marker, oldest first (whether the marker matches is checked on load)."""
    return sorted(int(m.group(1)) for name in storage.listdir(checkpoint_dir(run_dir))
                  if (m := _MARKER.match(name)))


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any]) -> str:
    """Write ``step-N.pt`` whole, then commit it with its marker; prune all but the newest KEEP."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = checkpoint_path(run_dir, step)
    storage.write_bytes(path, data)
    marker = {"step": step, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    storage.write_text(marker_path(run_dir, step), json.dumps(marker) + "\n")
    _prune(run_dir, keep_from=committed_steps(run_dir)[-KEEP:][0])
    return path


def _prune(run_dir: str, keep_from: int) -> None:
    """Delete checkpoints older than ``keep_from``: the marker first, so no marker names a missing file."""
    names = storage.listdir(checkpoint_dir(run_dir))
    old = sorted({int(m.group(1)) for name in names if (m := _MARKER.match(name) or _FILE.match(name))
                  and int(m.group(1)) < keep_from})
    for step in old:
        storage.remove(marker_path(run_dir, step))
        storage.remove(checkpoint_path(run_dir, step))


def read_committed(run_dir: str, step: int) -> bytes | None:
    """The bytes of checkpoint ``step`` if its marker exists and matches them, else None.

    Only a missing or unparsable file makes a checkpoint unusable: a store that cannot be
    reached raises, rather than letting a resumed run silently start from an older step.
    """
    try:
        marker = json.loads(storage.read_text(marker_path(run_dir, step)))
        data = storage.read_bytes(checkpoint_path(run_dir, step))
    except (storage.LocationNotFound, ValueError):
        return None
    if (not isinstance(marker, dict) or marker.get("step") != step or marker.get("bytes") != len(data)
            or marker.get("sha256") != hashlib.sha256(data).hexdigest()):
        return None
    return data


def load_latest_checkpoint(run_dir: str) -> tuple[int, dict[str, Any]] | None:
    """(step, state) of the newest committed checkpoint whose file matches its marker; None if there is none."""
    for step in reversed(committed_steps(run_dir)):
        data = read_committed(run_dir, step)
        if data is not None:
            return step, torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        warnings.warn(f"skipping checkpoint {checkpoint_path(run_dir, step)}: it does not match its commit marker",
                      stacklevel=2)
    return None


def load_checkpoint(path: str) -> dict[str, Any]:
    """One checkpoint file, as data (``weights_only``), without the commit check."""
    return torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)


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

    def __init__(self, run_dir: str, parts: dict[str, Any], generator: torch.Generator, rank: int,
                 world_size: int):
        self.run_dir, self.parts, self.generator = str(run_dir), parts, generator
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
        """Load the newest committed checkpoint into the parts; returns its position (None without one)."""
        found = load_latest_checkpoint(self.run_dir)
        if found is None:
            return None
        _, state = found
        for name, part in self.parts.items():
            if part is not None:
                part.load_state_dict(state[name])
        restore_rng_state(state["rng"][self.rank], self.generator)
        return state["position"]
