"""Checkpoints: ``save_pretrained`` weights plus the optimizer, scheduler, sampler and RNG states.

Layout of ``OUTPUT_DIR/checkpoint-000120/``: the model (``model.safetensors``,
``config.json``, ...) and tokenizer as ``save_pretrained`` writes them, and
``trainer_state.pt`` (step, optimizer, scheduler, prompt sampler, RNG states;
loadable with ``torch.load(weights_only=True)``), and ``checkpoint.json`` (the
step and the id of the run that wrote it). A checkpoint is written into a
temporary directory beside it and renamed into place, so a crash mid-save never
leaves a half-written ``checkpoint-*`` behind.

Pruning (``keep``) deletes only older checkpoints of the *same* run id: a
checkpoint written by another run, or by a version without run ids, is never
deleted, and one in the way of a new checkpoint of the same step is moved aside.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time

import torch

STATE_FILE = "trainer_state.pt"
INFO_FILE = "checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    """The global RNG states that sampling and shuffling draw from (python, torch CPU, CUDA)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the complete checkpoints in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def checkpoint_run_id(checkpoint_dir: str) -> str | None:
    """The run id recorded in a checkpoint (None: written without one)."""
    from .run_folder import run_id_in

    return run_id_in(os.path.join(checkpoint_dir, INFO_FILE))


def save_checkpoint(output_dir: str, step: int, *, model, tokenizer, state: dict, keep: int,
                    run_id: str | None = None) -> str:
    """Write ``checkpoint-{step}`` atomically, then delete all but the ``keep`` newest of run ``run_id``.

    Returns its path. With ``run_id=None`` nothing is pruned.
    """
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"checkpoint-{step:06d}")
    tmp = tempfile.mkdtemp(prefix=f".checkpoint-{step:06d}-", dir=output_dir)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({**state, "step": step, "run_id": run_id}, os.path.join(tmp, STATE_FILE))
        with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump({"step": step, "run_id": run_id}, f)
        if os.path.isdir(final):
            if run_id is not None and checkpoint_run_id(final) == run_id:  # this run's step saved again
                shutil.rmtree(final)
            else:  # another run's: never deleted
                os.replace(final, f"{final}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if run_id is not None:
        own = [path for _, path in list_checkpoints(output_dir) if checkpoint_run_id(path) == run_id]
        for old in own[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(checkpoint_dir: str) -> dict:
    """The ``trainer_state.pt`` of a checkpoint (tensors on the CPU)."""
    return torch.load(os.path.join(checkpoint_dir, STATE_FILE), map_location="cpu", weights_only=True)
