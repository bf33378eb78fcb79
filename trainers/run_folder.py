"""The run folder: which files belong to a run, and the checks made before a run touches it.

A run folder (``--output-dir``) holds one run: ``run.json`` (its id, written
when it starts), ``config.yaml``, ``metrics.jsonl``, ``metrics.png``,
``summary.json`` and ``checkpoint-NNNNNN/`` directories, each of which records
the run id it was written by. The rules:

- a new run refuses a folder that already holds a run, unless it is told to
  continue it (``resume``) or to move it aside (``overwrite``: the old run's
  files go into ``OUTPUT_DIR/previous-<date>-<time>/``; nothing is deleted);
- a resumed run keeps the run id of the run it continues and appends to its
  ``metrics.jsonl`` (a ``{"kind": "resume"}`` row marks where it restarted);
- checkpoint pruning only ever deletes checkpoints carrying the current run id;
- a resumed run starts from the run's saved ``config.yaml``; the command line may change only
  what does not make it another experiment (:data:`RESUME_REFUSED` is refused, naming the key).
  Every change is recorded, old and new value, in ``run.json`` (``resumes``) and in the resume row
  of ``metrics.jsonl``, before ``config.yaml`` is rewritten, so the original settings are kept.

Every check here reads only; nothing is created until the model has loaded.
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid

RUN_FILE = "run.json"
RUN_FILES = (RUN_FILE, "config.yaml", "metrics.jsonl", "metrics.png", "summary.json")
CONFIG_FILE = "config.yaml"
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
# Keys a resumed run may not change: they define the experiment and its evaluation.
RESUME_REFUSED = ("algo", "algo_options", "model", "ref_model", "dataset", "eval_dataset", "arithmetic_digits",
                  "num_eval_prompts", "eval_samples", "answer_format", "rewards", "seed")
# Keys a resumed run changes freely: length, cadence, output and where/how it computes.
RESUME_FREE = ("max_steps", "eval_every", "eval_at_start", "log_every", "save_every", "keep_checkpoints", "plot",
               "output_dir", "resume", "overwrite", "device", "torch_threads", "backend", "attn_implementation",
               "micro_batch_size", "rollout_engine", "rollout_engine_options", "parallelism", "fsdp_generation")
# Any other key (learning_rate, loss, num_prompts, ...) may change with a warning; the change is recorded.


class RunFolderError(ValueError):
    """The output folder cannot be used as asked (it names ``output_dir`` and the way out)."""


def run_files(output_dir: str) -> list[str]:
    """Names in ``output_dir`` that belong to a run (run files and checkpoints), sorted; [] if none."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if n in RUN_FILES or _CHECKPOINT.match(n))


def check_creatable(path: str, field: str = "output_dir") -> None:
    """Raise :class:`RunFolderError` unless ``path`` is a writable directory or can be created. Creates nothing."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise RunFolderError(f"{field} {path!r} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise RunFolderError(f"{field} {path!r} is not writable")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunFolderError(f"{field} {path!r} cannot be created: {parent!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunFolderError(f"{field} {path!r} cannot be created: {parent!r} is not writable")


def check_run_folder(output_dir: str, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds a run, unless ``resume`` (continue it) or ``overwrite`` (move it aside)."""
    check_creatable(output_dir)
    if resume and overwrite:
        raise RunFolderError("resume and overwrite exclude each other: --resume continues the run in output_dir, "
                             "--overwrite moves it aside and starts afresh")
    found = run_files(output_dir)
    if not found or overwrite:
        return
    shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    if not resume:
        raise RunFolderError(
            f"output_dir {output_dir!r} already holds a run ({shown}): continue it with --resume, or start afresh "
            f"in a new --output-dir or with --overwrite (moves the old run into {output_dir}/previous-<time>/, "
            "deletes nothing)")
    from .checkpoint import latest_checkpoint

    if latest_checkpoint(output_dir) is None:  # complete checkpoints only
        raise RunFolderError(
            f"output_dir {output_dir!r} holds a run ({shown}) but no checkpoint to resume from: start afresh "
            "with --overwrite (moves the old run aside) or in a new --output-dir")


def read_saved_config(output_dir: str) -> dict | None:
    """The mapping in ``output_dir/config.yaml`` as the run saved it (None when the folder has none)."""
    import yaml

    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise RunFolderError(f"{path} is not a mapping of config fields")
    return values


def resume_changes(output_dir: str, config) -> dict[str, list]:
    """``{key: [saved, now]}`` for each setting ``config`` changes against the run's saved ``config.yaml``.

    Only keys the file holds are compared; ``resume``, ``overwrite`` and ``output_dir`` are not.
    Raises :class:`RunFolderError` naming the first key of :data:`RESUME_REFUSED` that changed.
    """
    saved_values = read_saved_config(output_dir)
    if saved_values is None:
        return {}
    try:
        saved = type(config).from_dict(saved_values).to_dict()
    except (ValueError, TypeError) as e:
        raise RunFolderError(f"{os.path.join(output_dir, CONFIG_FILE)}: {e}") from None
    now = config.to_dict()
    changes = {key: [saved[key], now[key]] for key in saved_values
               if key in now and key not in ("resume", "overwrite", "output_dir") and saved[key] != now[key]}
    for key in RESUME_REFUSED:
        if key in changes:
            raise RunFolderError(
                f"--resume cannot change {key} (the run in {output_dir!r} has {key}={changes[key][0]!r}, "
                f"given {changes[key][1]!r}): drop it, or start a new run in a new --output-dir")
    return changes


def record_resume(output_dir: str, step: int, checkpoint: str, changes: dict[str, list]) -> None:
    """Append ``{started, step, checkpoint, changed}`` to the ``resumes`` list of ``output_dir/run.json``."""
    path = os.path.join(output_dir, RUN_FILE)
    info = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    info.setdefault("resumes", []).append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step,
                                           "checkpoint": checkpoint, "changed": changes})
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)


def move_run_aside(output_dir: str) -> str | None:
    """Move the run files of ``output_dir`` into a new ``previous-<date>-<time>/`` inside it.

    Returns that folder (None when there was nothing to move). Other files stay where they are.
    """
    found = run_files(output_dir)
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = os.path.join(output_dir, f"previous-{stamp}"), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(output_dir, f"previous-{stamp}-{n}")
    os.makedirs(target)
    for name in found:
        os.replace(os.path.join(output_dir, name), os.path.join(target, name))
    return target


def new_run_id() -> str:
    """A fresh run id: the start time and 8 random hex digits."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def run_id_in(path: str) -> str | None:
    """The ``run_id`` field of the JSON file ``path`` (None when the file or the field is missing)."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("run_id")


def read_run_id(output_dir: str) -> str | None:
    """The id in ``output_dir/run.json`` (None when the folder has none)."""
    return run_id_in(os.path.join(output_dir, RUN_FILE))


def write_run_file(output_dir: str, run_id: str, **info) -> None:
    """Write ``output_dir/run.json``: the run id and ``info`` (algorithm, seed, model, start time)."""
    with open(os.path.join(output_dir, RUN_FILE), "w", encoding="utf-8") as f:
        json.dump({"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}, f, indent=2)


def default_output_dir(algo: str) -> str:
    """``runs/<algo>-<date>-<time>``: where a run goes when no output_dir is given."""
    return os.path.join("runs", f"{algo}-{time.strftime('%Y%m%d-%H%M%S')}")


def write_yaml(path: str, values: dict) -> None:
    import yaml

    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(values, f, sort_keys=False)
