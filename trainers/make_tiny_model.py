"""Build the embedded default model ``assets/tiny-arith``: a tiny causal LM warmed up on addition.

    python -m entropy_ops.trainers.make_tiny_model     # writes trainers/assets/tiny-arith

What it writes (4.2 MB): ``config.json``, ``generation_config.json``,
``model.safetensors`` (fp32) and the tokenizer files. Nothing is downloaded.

- Tokenizer: character level, built with ``tokenizers`` (``WordLevel`` over
  single characters, with ``\\boxed{`` as one token, ``<pad>``, ``<eos>``,
  ``<unk>``; 64 tokens).
- Model: a ``Qwen2Config`` decoder (hidden 128, 4 layers, 4 heads, MLP 512,
  tied embeddings; 1,059,456 parameters), randomly initialized with the seed.
- Warm-up: supervised training on the arithmetic task of ``tasks.py``
  (``What is 37+48?`` -> ``\\boxed{85}<eos>``, loss on the completion only,
  held-out pairs excluded), AdamW, batch 128, learning rate 1e-3 with 100
  linear warm-up steps and a cosine decay over 1600 steps. The model learns the
  tens and hundreds digits first and the units digit (a lookup of the two
  operands' last digits) suddenly, between steps 300 and 500 (held-out greedy
  accuracy 0.18 at 300, 0.75 at 400, 0.99 at 500). The default stops at step
  400, in the middle of that jump, on purpose: the model formats every answer,
  is right 75% of the time greedily but only 52% when sampled at temperature 1,
  so the RL run that starts from it has something to learn. (Without the
  warm-up, at a constant 3e-3, the units digit was still at chance after 1000 steps.)

Deterministic: with the defaults (one thread) two builds gave bit-identical
``model.safetensors`` (torch 2.13.0 CPU). Run time: 170 s wall (127 s CPU) on
the project's shared 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import torch

from .tasks import arithmetic_task

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
BOXED_TOKEN = "\\boxed{"
# Every character the prompts and answers of the arithmetic task use, plus a
# small margin (letters, punctuation) so that other short prompts tokenize
# without <unk>.
CHARACTERS = list("0123456789+-*/=?.,:;()[]{}\\^_ ") + list("abcdefghijklmnopqrstuvwxyz") + list("WHAT")
# The model's size (the project's feasibility recipe): 1.06M parameters, 4.2 MB as fp32.
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)


def build_tokenizer():
    """The character-level tokenizer, as a ``PreTrainedTokenizerFast`` (left padding, for generation)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [BOXED_TOKEN] + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # "\boxed{" as one piece, every other character alone (newlines included).
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # concatenate the pieces back, no separator
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left", model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )


def build_model(tokenizer, seed: int):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=8,
    )
    return model


def completion_text(answer: str) -> str:
    """The reference completion the warm-up teaches: ``\\boxed{answer}``."""
    return f"{BOXED_TOKEN}{answer}}}"


def encode_batch(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``prompt + completion + <eos>``; labels are -100 on the prompt and the padding."""
    seqs, labels = [], []
    for row in rows:
        p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(completion_text(row["answer"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    lab = torch.tensor([[-100] * (width - len(s)) + s for s in labels])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, lab, mask


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], *, samples: int, seed: int) -> dict:
    """Greedy accuracy and sampled (temperature 1) accuracy on ``rows``."""
    from .rewards import MathCorrectness
    from .rollout import HFGenerateEngine

    engine = HFGenerateEngine(model, tokenizer)
    reward = MathCorrectness()
    prompts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    torch.manual_seed(seed)
    greedy = engine.generate(prompts, num_samples=1, max_new_tokens=8, greedy=True)
    sampled = engine.generate(prompts, num_samples=samples, max_new_tokens=8, temperature=1.0)
    g = reward(greedy.prompts, greedy.completions, answer=answers)
    s = reward(sampled.prompts, sampled.completions, answer=[a for a in answers for _ in range(samples)])
    return {"greedy": sum(g) / len(g), "sampled": sum(s) / len(s)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "assets", "tiny-arith"))
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps (the default stops mid-way on purpose)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    ap.add_argument("--decay-steps", type=int, default=1600, help="horizon of the cosine decay to 10%% of --lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--save-at", type=int, nargs="*", default=[], help="also save snapshots OUT-stepN at these steps")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    train_rows, eval_rows = arithmetic_task()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, parameters {n_params:,}, train pairs {len(train_rows)}, held out {len(eval_rows)}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.55 + 0.45 * math.cos(math.pi * min(1.0, s / args.decay_steps))))
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        model.train()
        ids, labels, mask = encode_batch(tokenizer, rng.sample(train_rows, args.batch_size))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            acc = evaluate(model, tokenizer, eval_rows, samples=2, seed=args.seed)
            print(f"step {step:5d}  loss {loss.item():.4f}  held-out greedy {acc['greedy']:.3f}  "
                  f"sampled {acc['sampled']:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if step in args.save_at:
            save(model, tokenizer, f"{args.out}-step{step}")
    save(model, tokenizer, args.out)
    print(json.dumps({"out": args.out, "steps": args.steps, "seconds": round(time.perf_counter() - t0, 1)}))


def save(model, tokenizer, out: str) -> None:
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    main()
