"""Checks made before anything heavy loads: is the output folder usable, is the model there, or can it be
fetched? (:func:`check_before_loading` runs them all.)

:func:`check_model_available` accepts a local model directory, the embedded
``tiny-arith``, or a Hub name that is already in the local Hugging Face cache.
For any other Hub name it asks the Hub once, with a short timeout and no
retries, so that a missing network or a misspelt name is a one-line error
within seconds instead of a long series of download retries. With
``HF_HUB_OFFLINE=1`` the Hub is never asked.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import TrainConfig

HUB_TIMEOUT_S = 5.0


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def check_model_available(field: str, name: str, *, timeout: float = HUB_TIMEOUT_S) -> None:
    """Raise ``ValueError`` naming ``field`` unless the model ``name`` can be loaded."""
    from .model import check_model_reference, resolve_model_path

    check_model_reference(field, name)  # paths, the embedded model, and the cache when offline
    if os.path.isdir(resolve_model_path(name)) or _offline():
        return
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    try:
        HfApi().model_info(name, timeout=timeout)
    except GatedRepoError:
        raise ValueError(f"{field}: {name!r} is a gated model on the Hugging Face Hub; accept its terms and "
                         "log in (`hf auth login`), or pass a local directory") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{field}: {name!r} is not a local directory and not a model on the Hugging Face Hub "
                         "(or it is private: log in with `hf auth login`)") from None
    except Exception as e:  # no network, proxy, DNS, timeout: whatever the HTTP client raises
        raise ValueError(f"{field}: {name!r} is not in the local Hugging Face cache and the Hub cannot be reached "
                         f"({type(e).__name__}: {str(e)[:120]}); download it where there is a network, "
                         "or pass a local directory") from None


def check_before_loading(config: TrainConfig) -> str:
    """The checks that need no model: the run folder (see ``run_folder.py``) and the models' availability.

    Raises ``ValueError`` naming the field; reads only. Returns the output directory.
    """
    from .run_folder import check_run_folder, default_output_dir, resume_changes

    output_dir = config.output_dir or default_output_dir(config.algo)
    check_run_folder(output_dir, resume=config.resume, overwrite=config.overwrite)
    if config.resume:
        resume_changes(output_dir, config)  # refuses a change of algo, model, dataset, seed, ...
    check_model_available("model", config.model)
    if config.ref_model is not None:
        check_model_available("ref_model", config.ref_model)
    return output_dir
