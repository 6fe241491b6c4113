"""Training checkpoints that survive being killed at any moment.

A checkpoint is a Hugging Face directory (config.json + model.safetensors from ``minke.save``, the
tokenizer files) plus ``trainer_state.pt`` (optimizer, scheduler, step, RNG states, data position,
the run's config). Layout of an output directory:

    step-000100/  step-000200/    complete checkpoints (the last ``keep``)
    final -> step-000200          symlink to the last checkpoint of a finished run
    ckpt.tmp-<pid>/               a save in progress; left behind only by a crash, removed on start

Atomicity: everything is written into ``ckpt.tmp-<pid>``, fsynced, then the directory is renamed to
``step-XXXXXX`` in one ``os.rename``: a step directory either exists complete or not at all. The
latest checkpoint is the highest-numbered step directory, so no pointer file can disagree with it.
Old checkpoints are renamed to ``ckpt.del-…`` before being deleted, so a crash mid-delete leaves
nothing that looks complete.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from ..model.weights import save as save_model

STATE = "trainer_state.pt"
_STEP = re.compile(r"^step-(\d+)$")


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dirs(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _STEP.match(p.name)) and (p / STATE).exists()]
    return [p for _, p in sorted(found)]


def latest(out: str | os.PathLike) -> Path | None:
    dirs = step_dirs(out)
    return dirs[-1] if dirs else None


def clean(out: str | os.PathLike) -> list[Path]:
    """Remove what an interrupted save or prune left behind; returns the removed paths."""
    out = Path(out)
    gone = [*out.glob("ckpt.*"), *out.glob("final.tmp-*")] if out.is_dir() else []
    for p in gone:
        if p.is_symlink():
            p.unlink()
        else:
            shutil.rmtree(p, ignore_errors=True)
    return gone


def save(out: str | os.PathLike, step: int, model, tokenizer, state: dict, keep: int = 2) -> Path:
    """Write step-XXXXXX atomically, then drop all but the newest ``keep`` checkpoints."""
    out = Path(out)
    final = out / f"step-{step:06d}"
    if final.exists():  # this very step is already saved (e.g. the last step is also a save step)
        return final
    tmp = out / f"ckpt.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tmp)
    tokenizer.save(tmp)
    torch.save(state, tmp / STATE)  # last: a directory holding it is complete
    _fsync_tree(tmp)
    os.rename(tmp, final)
    _fsync_dir(out)
    prune(out, keep)
    return final


def prune(out: Path, keep: int) -> None:
    target = (out / "final").resolve() if (out / "final").is_symlink() else None
    for p in step_dirs(out)[:-keep] if keep > 0 else []:
        if p.resolve() != target:
            dead = out / f"ckpt.del-{p.name}"
            os.rename(p, dead)
            shutil.rmtree(dead, ignore_errors=True)


def link_final(out: str | os.PathLike, ckpt: Path) -> Path:
    """Point ``out/final`` at ``ckpt`` (a relative symlink, replaced atomically)."""
    out = Path(out)
    tmp = out / f"final.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(ckpt, out), tmp)
    os.replace(tmp, out / "final")
    return out / "final"


def load_state(ckpt: str | os.PathLike) -> dict:
    return torch.load(Path(ckpt) / STATE, map_location="cpu", weights_only=True)
