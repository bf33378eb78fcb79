"""Loading a Hugging Face causal LM, and running it as body + lm_head for the fused ops.

The trainer never asks the model for logits: it runs the *body*
(``model.get_decoder()``, e.g. ``Qwen2Model``, whose output already went through
the final norm) to get the last hidden states, keeps only the completion
positions, and hands them with the output head (:func:`lm_head_of`, i.e.
``entropy_ops.output_head.output_head``: weight, bias, logit scale, soft-cap)
to the fused op, which streams the vocabulary without materializing ``[N, V]``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from importlib import resources

import torch

from entropy_ops.output_head import OutputHead, output_head

from .config import TINY_MODEL

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def tiny_model_path() -> str:
    """Directory of the embedded model ``tiny-arith`` inside the installed package."""
    return str(resources.files("entropy_ops.trainers").joinpath("assets", TINY_MODEL))


def resolve_model_path(name: str) -> str:
    """``tiny-arith`` -> the embedded model's directory; anything else unchanged."""
    return tiny_model_path() if name == TINY_MODEL else name


def check_model_reference(field: str, name: str) -> None:
    """Raise ``ValueError`` when ``name`` is neither a model directory nor a plausible Hub name.

    Runs before any model is loaded. A Hub name is only checked against the
    local cache when ``HF_HUB_OFFLINE`` is set (otherwise transformers downloads it).
    """
    path = resolve_model_path(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{field}: directory {path!r} has no config.json; it is not a saved Hugging Face model")
        return
    if name == TINY_MODEL:
        raise ValueError(f"{field}: the embedded model is missing from {path!r}; rebuild it with "
                         "`python -m entropy_ops.trainers.make_tiny_model` or reinstall entropy-ops")
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or not _HUB_ID.match(name)
    if looks_like_path:
        raise ValueError(f"{field}: model path {name!r} does not exist")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ValueError(f"{field}: {name!r} is not a local directory and not in the Hugging Face cache "
                             "(HF_HUB_OFFLINE is set, so it cannot be downloaded)")


def choose_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available")
    return device


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on CPU."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, requested)


def choose_attn_implementation(requested: str, device: torch.device) -> str:
    """``auto``: ``flash_attention_2`` on CUDA when flash-attn is installed, else ``sdpa``."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(name: str, *, device: torch.device, dtype: torch.dtype, attn_implementation: str):
    """``AutoModelForCausalLM`` from a Hub name or directory, on ``device`` in ``dtype``, in eval mode.

    Eval mode keeps dropout off during RL, so the rollout policy and the
    policy being trained agree token for token (the on-policy ratio is 1).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval()


# Tokenizer classes that mean "just the tokenizer.json": AutoTokenizer would swap them for the model
# type's own class (a Qwen2 model gets Qwen2Tokenizer, which rebuilds its own pre-tokenizer).
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(name: str):
    """The model's tokenizer, with left padding and a pad token (the end token when it has none).

    A local directory whose ``tokenizer_config.json`` declares a generic fast tokenizer
    (the embedded model's character-level one) is loaded as exactly that.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = resolve_model_path(name)
    declared = None
    config_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            declared = json.load(f).get("tokenizer_class")
    loader = PreTrainedTokenizerFast if declared in _GENERIC_TOKENIZERS else AutoTokenizer
    tokenizer = loader.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lm_head_of(model) -> OutputHead:
    """The model's output head (weight, bias, logit scale, final soft-cap): the project's one reader of
    output heads, :func:`entropy_ops.output_head.output_head` (generic over Hugging Face families).

    The trainer uses ``.weight``, ``.bias``, ``.logit_softcap`` and ``.op_temperature(t)`` (the
    logit scale folded into the temperature). Raises ``TypeError`` / ``ValueError`` naming the family
    for a head the fused op cannot reproduce.
    """
    return output_head(model)


def completion_hidden(model, input_ids, attention_mask, position_ids, prompt_len: int) -> torch.Tensor:
    """Last hidden states ``[B, T, D]`` at the positions that predict the completion tokens.

    ``input_ids`` is ``[prompt (P columns) | completion (T columns)]``. Position
    ``P - 1 + t`` predicts completion token ``t``, so the body runs on the first
    ``P + T - 1`` columns and the rows ``P - 1 ..`` are kept: the prompt's other
    positions never reach the vocabulary.
    """
    body = model.get_decoder()
    out = body(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
               position_ids=position_ids[:, :-1], use_cache=False)
    return out.last_hidden_state[:, prompt_len - 1:]


# Below this many parameters a CPU run uses one thread: the matmuls (128 x 512 for the embedded
# model) are too small to split, and on a shared machine every multi-threaded op waits for a
# descheduled thread. Measured on the project's shared 2-core machine, the default run (200 steps,
# seed 0): 1 thread 122-128 s wall (117-121 s CPU), 2 threads 1143 s wall (850 s CPU), same result.
SINGLE_THREAD_MAX_PARAMS = 10_000_000


def auto_threads(model, device) -> int | None:
    """Thread count for ``torch_threads = 0``: 1 for a small model on CPU, else ``None`` (torch's default)."""
    if device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SINGLE_THREAD_MAX_PARAMS:
        return 1
    return None
