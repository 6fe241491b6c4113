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

Resuming: ``newest_loadable`` is the newest checkpoint that ``verify`` can read (a disk error or a
copy cut short can still spoil a complete-looking one); the unreadable ones after it are skipped
with a warning and, in the directory the run writes to, renamed to ``bad-step-XXXXXX``, so that no
later save, prune or resume takes them for good ones. ``check_resume_out`` refuses ``--resume A
--out B`` when B already holds checkpoints: they are another run's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import warnings
from pathlib import Path

import torch

from ..model.weights import CheckpointError, checkpoint_files
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
    """Write step-XXXXXX atomically, then drop all but the newest ``keep`` checkpoints. A step-XXXXXX
    already there (a run resumed from an earlier checkpoint passing it again) is replaced: what is
    saved under a step is this run's state at that step, never an older file kept silently."""
    out = Path(out)
    final = out / f"step-{step:06d}"
    tmp = out / f"ckpt.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tmp)
    tokenizer.save(tmp)
    torch.save(state, tmp / STATE)  # last: a directory holding it is complete
    _fsync_tree(tmp)
    dead = None
    if final.exists():  # out of the way first (a rename cannot replace a non-empty directory)
        dead = out / f"ckpt.del-{final.name}"
        shutil.rmtree(dead, ignore_errors=True)
        os.rename(final, dead)
    os.rename(tmp, final)
    _fsync_dir(out)
    if dead is not None:
        shutil.rmtree(dead, ignore_errors=True)
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


# ---- resuming -------------------------------------------------------------------------------------
def _check_safetensors(fn: str) -> None:
    """The header parses and every tensor's byte range lies inside the file, which ends where the
    last one does (a file cut short, or padded with garbage, fails)."""
    size = os.path.getsize(fn)
    with open(fn, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{fn}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{fn}: header of {n} bytes runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{fn}: unreadable safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{fn}: {size} bytes, but its header describes {8 + n + end}")


def verify(ckpt: str | os.PathLike) -> dict:
    """Check that ``ckpt`` can be resumed from without reading its weights: every JSON file
    (config, tokenizer, index) parses, every weight file is whole, trainer_state.pt loads. Returns
    the trainer state; raises CheckpointError naming the file."""
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").exists():
        raise CheckpointError(f"{ckpt}: no config.json")
    for fn in sorted(ckpt.glob("*.json")):
        try:
            json.loads(fn.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{fn}: not valid JSON ({e})") from None
    files, _ = checkpoint_files(str(ckpt))
    for fn in files:
        _check_safetensors(fn)
    try:
        return load_state(ckpt)
    except Exception as e:  # torch raises several types for a torn or foreign pickle
        raise CheckpointError(f"{ckpt / STATE}: cannot be loaded ({type(e).__name__}: {e})") from None


def newest_loadable(out: str | os.PathLike, quarantine: bool = False) -> tuple[Path, dict] | None:
    """The newest complete checkpoint of ``out`` that ``verify`` accepts, with its trainer state (None
    if there is none). Each newer one is skipped with a warning naming it and what is wrong;
    ``quarantine=True`` (``out`` is the directory this run writes to) also renames it to
    bad-step-XXXXXX, out of reach of ``latest``, ``prune`` and ``clean``."""
    for p in reversed(step_dirs(out)):
        try:
            return p, verify(p)
        except CheckpointError as e:
            msg = f"skipping checkpoint {p}: {e}"
            if quarantine:
                bad, n = p.with_name(f"bad-{p.name}"), 1
                while bad.exists():
                    bad, n = p.with_name(f"bad-{p.name}.{n}"), n + 1
                os.rename(p, bad)
                msg += f" (moved to {bad.name})"
            warnings.warn(msg, stacklevel=2)
    return None


def check_resume_out(resume: str | os.PathLike, out: str | os.PathLike) -> None:
    """``--resume A --out B``: B must be A itself or hold no checkpoint. Another run's step-N in B
    would be taken for this run's (``latest``, the ``final`` link), or mixed with them."""
    if Path(out).resolve() == Path(resume).resolve():
        return
    found = step_dirs(out)
    if found:
        raise CheckpointError(f"--out {out} already holds checkpoints ({', '.join(p.name for p in found)}) "
                              f"of another run than --resume {resume}: choose an empty --out, or "
                              f"--resume {out} to continue that run")
