"""``entropy-ops generate``: sample completions, optionally with EM-INF or adaptive temperature.

    entropy-ops generate --em-inf                      # held-out prompts of the default task, embedded model
    entropy-ops generate --model Qwen/Qwen2.5-0.5B --prompt "What is 2+2?" --em-inf --delta 0.3
    entropy-ops generate --em-inf --compare            # plain sampling vs EM-INF, same seed

``--em-inf`` adds :class:`entropy_ops.em_inf.EMInfLogitsProcessor` to ``generate``
(a few Adam steps per decoding step on the step's logits, down to the entropy
floor ``--delta``); ``--adaptive-temperature`` adds the bisection-on-temperature
baseline instead. Both leave the argmax unchanged, so with ``--greedy`` they
change nothing: they act on sampled decoding (``--temperature``, ``--top-p``,
``--top-k``). Prompts come from ``--prompt`` (repeatable), ``--prompts-file``
(a text file, one prompt per line, or JSONL rows with ``prompt`` and optional
``answer``), or by default the held-out split of a generated task (``--task``). When the rows
have answers, the accuracy of each decoding is printed (``--answer-format``).
``--compare`` decodes the prompts twice, without and with the processor, from
the same random seed. ``--output FILE`` writes one JSON line per completion.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .config import TINY_MODEL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entropy-ops generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=TINY_MODEL, help="Hugging Face name, local directory or 'tiny-arith'")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="text file (one prompt per line) or JSONL with 'prompt' [+ 'answer']")
    p.add_argument("--num-prompts", type=int, default=32, help="held-out prompts of --task used by default")
    p.add_argument("--task", default=None, help="generated task of the default prompts ('addition', 'arithmetic'; "
                                                 "default: the trainer's default dataset)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--em-inf", action="store_true", help="EM-INF on every decoding step")
    mode.add_argument("--adaptive-temperature", action="store_true", help="the adaptive-temperature baseline")
    p.add_argument("--n-steps", type=int, default=5, help="EM-INF Adam steps per decoding step")
    p.add_argument("--lr", type=float, default=0.1, help="EM-INF Adam learning rate")
    p.add_argument("--delta", type=float, default=0.3, help="entropy floor (nats) for EM-INF / adaptive temperature")
    p.add_argument("--kl-weight", type=float, default=0.001, help="EM-INF weight of KL(original || adjusted)")
    p.add_argument("--alpha", type=float, default=0.5, help="adaptive temperature: target = max(alpha * H, delta)")
    p.add_argument("--compare", action="store_true", help="also decode without the processor (same seed)")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (EM-INF then changes nothing)")
    p.add_argument("--answer-format", default="boxed", help="'boxed', 'gsm8k' or 'last_number' (for accuracy)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--backend", default="auto", help="fused-op backend: 'auto', 'triton' or 'torch'")
    p.add_argument("--output", help="JSONL file: one row per completion")
    p.add_argument("--quiet", action="store_true", help="print only the accuracy lines")
    return p


def load_prompt_rows(args) -> list[dict]:
    """``[{"prompt": ..., "answer"?: ...}]`` from ``--prompt``, ``--prompts-file`` or a task's held-out split."""
    if args.prompt:
        return [{"prompt": p} for p in args.prompt]
    if args.prompts_file:
        rows = []
        with open(args.prompts_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    row = json.loads(line)
                    if not isinstance(row.get("prompt"), str):
                        raise ValueError(f"--prompts-file line {n}: a JSON row needs a string 'prompt'")
                    rows.append(row)
                else:
                    rows.append({"prompt": line})
        if not rows:
            raise ValueError(f"--prompts-file {args.prompts_file!r} holds no prompts")
        return rows
    from .config import TrainConfig
    from .tasks import task_rows

    task = args.task or TrainConfig().dataset
    return task_rows(task, num_eval=max(args.num_prompts, 1))[1][: args.num_prompts]


def check_args(args) -> None:
    for name in ("num_prompts", "n_steps", "num_samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    if args.task is not None:
        from .tasks import TASKS

        if args.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {args.task!r}")
    if args.prompts_file is not None and not os.path.isfile(args.prompts_file):
        raise ValueError(f"--prompts-file {args.prompts_file!r} does not exist")
    if args.output is not None:
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            raise ValueError(f"--output {args.output!r}: directory {parent!r} does not exist")
    from .preflight import check_model_available

    check_model_available("--model", args.model)  # before anything loads; a Hub name: one quick request


def build_processor(args):
    """The logits processor of ``--em-inf`` / ``--adaptive-temperature`` (None: neither)."""
    from entropy_ops.em_inf import AdaptiveTemperatureLogitsProcessor, EMInfLogitsProcessor

    if args.em_inf:
        return EMInfLogitsProcessor(n_steps=args.n_steps, lr=args.lr, delta=args.delta, kl_weight=args.kl_weight,
                                    backend=args.backend)
    if args.adaptive_temperature:
        return AdaptiveTemperatureLogitsProcessor(args.alpha, args.delta, backend=args.backend)
    return None


@torch.no_grad()
def decode(model, tokenizer, prompts: list[str], args, processor) -> list[str]:
    """``num_samples`` completions per prompt (prompt-major), new tokens only, special tokens skipped."""
    from transformers import LogitsProcessorList

    from .rollout import end_token_ids

    eos = end_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    sampling = {} if args.greedy else {"temperature": args.temperature, "top_p": args.top_p,
                                       "top_k": args.top_k or None}
    torch.manual_seed(args.seed)
    out = []
    for start in range(0, len(prompts), args.batch_size):
        part = prompts[start:start + args.batch_size]
        enc = tokenizer(part, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        ids = model.generate(
            **enc, do_sample=not args.greedy, num_return_sequences=args.num_samples,
            max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
            logits_processor=LogitsProcessorList([processor] if processor is not None else []), **sampling)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        rows = load_prompt_rows(args)
        processor = build_processor(args)
        from .rewards import MathCorrectness

        correctness = MathCorrectness(args.answer_format)
    except (ValueError, TypeError, OSError) as e:
        parser.exit(2, f"entropy-ops generate: error: {e}\n")
    from transformers.utils import logging as hf_logging

    from .model import choose_attn_implementation, choose_device, choose_dtype, load_model, load_tokenizer

    hf_logging.disable_progress_bar()
    device = choose_device(args.device)
    model = load_model(args.model, device=device, dtype=choose_dtype("auto", device),
                       attn_implementation=choose_attn_implementation("auto", device)).eval()
    tokenizer = load_tokenizer(args.model)
    prompts = [r["prompt"] for r in rows]
    name = "em-inf" if args.em_inf else "adaptive-temperature" if args.adaptive_temperature else "sampling"
    runs = {}
    if args.compare and processor is not None:
        runs["plain"] = decode(model, tokenizer, prompts, args, None)
    runs[name] = decode(model, tokenizer, prompts, args, processor)
    has_answers = all("answer" in r for r in rows)
    records = []
    for label, completions in runs.items():
        answers = [r.get("answer") for r in rows for _ in range(args.num_samples)]
        scores = correctness(None, completions, answer=answers) if has_answers else [None] * len(completions)
        for i, (text, score) in enumerate(zip(completions, scores)):
            records.append({"decoding": label, "prompt": prompts[i // args.num_samples], "completion": text,
                            **({"correct": score} if score is not None else {})})
            if not args.quiet:
                print(f"[{label}] {prompts[i // args.num_samples]!r} -> {text!r}"
                      + ("" if score is None else f"  ({'correct' if score else 'wrong'})"))
        if has_answers:
            print(f"{label}: accuracy {sum(scores) / len(scores):.3f} ({int(sum(scores))}/{len(scores)})")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
