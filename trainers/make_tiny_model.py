"""Build the embedded default model ``assets/tiny-arith``: a tiny causal LM warmed up on scratchpad addition.

    python -m entropy_ops.trainers.make_tiny_model     # writes trainers/assets/tiny-arith

What it writes (about 4.3 MB): ``config.json``, ``generation_config.json``,
``model.safetensors`` (fp32), the tokenizer files and ``warmup.json`` (the
warm-up curve and the snapshot chosen). Nothing is downloaded.

- Tokenizer: character level, built with ``tokenizers`` (``WordLevel`` over
  single characters, with ``\\boxed{`` as one token, ``<pad>``, ``<eos>``,
  ``<unk>``; 64 tokens; ``=`` and ``;`` of the scratchpad were already in it).
- Model: a ``Qwen2Config`` decoder (hidden 128, 4 layers, 4 heads, MLP 512,
  tied embeddings, rotary positions up to 128; 1,059,456 parameters), randomly
  initialized with the seed.
- Warm-up: supervised training on the ``addition`` task of ``tasks.py``
  (``What is 23+58+41?`` -> ``23+41=64;64+58=122;\\boxed{122}<eos>``, the operands
  summed in a random order, loss on the completion only, held-out problems
  excluded), AdamW, batch 128 bucketed by length, learning rate 1e-3 with 100
  linear warm-up steps and a cosine decay to 10% over a 3000-step horizon.
- The planted slice: a fraction ``--planted-frac`` (15%) of the warm-up examples
  are slice problems (two operands with units digits 7 and 8), and in every
  warm-up trace a step whose units digits are 7 and 8 drops its carry
  (``27+38=55``): the model learns a confident, systematic mistake that only a
  reward can reveal.
- Snapshot chosen by evaluation: from step ``--eval-from`` on, every
  ``--eval-every`` steps the held-out greedy accuracy is measured on
  ``--eval-prompts`` held-out problems; training stops once it passes
  ``--stop-above``, and the snapshot whose accuracy is closest to ``--target``
  (0.45) is written: a moderate accuracy, so RL has something to learn, and a
  model that formats every answer. The warm-up accuracy rises by about 10
  points per 100 steps but not monotonically, hence evaluation, not a fixed step.

Seeded data and initialization, one thread: meant to be deterministic (the
earlier 2-digit build gave bit-identical weights twice; this build was not yet
rebuilt to compare). ``warmup.json`` records the curve, the chosen step and the wall time. The
shipped model: held-out greedy accuracy (500 problems) 0.24 / 0.22 / 0.30 /
0.38 / 0.32 / 0.40 / **0.45** / 0.48 / 0.54 / 0.61 at steps 500-1400, so step 1100
was kept: greedy 0.448, sampled 0.34, planted slice greedy 0.09 (the slice only
dropped below 0.3 from step 1000 on). 1603 s wall on the project's shared 2-core
machine, other jobs running beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import torch

from .tasks import addition_task, problem_key, random_operands, scratchpad

MAX_NEW_TOKENS = 48  # the longest trace (4 operands of 3 digits) is 47 tokens with <eos>

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
BOXED_TOKEN = "\\boxed{"
# Every character the prompts and answers of the arithmetic task use, plus a
# small margin (letters, punctuation) so that other short prompts tokenize
# without <unk>.
CHARACTERS = list("0123456789+-*/=?.,:;()[]{}\\^_ ") + list("abcdefghijklmnopqrstuvwxyz") + list("WHAT")
# The model's size: about 1.07M parameters, 4.3 MB as fp32; 128 positions hold the longest prompt + trace.
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)


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
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=MAX_NEW_TOKENS,
    )
    return model


def warmup_example(rng: random.Random, held_out: set, *, planted_frac: float) -> dict:
    """One warm-up example: a problem not held out, its operands in a random order, the planted trace."""
    while True:
        ops = random_operands(rng, planted=rng.random() < planted_frac)
        if problem_key(ops) not in held_out:
            break
    order = rng.sample(ops, len(ops))
    return {"prompt": "What is " + "+".join(map(str, ops)) + "?", "completion": scratchpad(order, drop_carry_78=True)}


def warmup_batches(rng: random.Random, held_out: set, *, batch_size: int, planted_frac: float, bucket: int = 8):
    """``bucket`` batches at a time: ``bucket * batch_size`` examples sorted by length, cut into
    batches (little padding), in a random order. An endless generator."""
    while True:
        pool = [warmup_example(rng, held_out, planted_frac=planted_frac) for _ in range(bucket * batch_size)]
        pool.sort(key=lambda r: len(r["prompt"]) + len(r["completion"]))
        batches = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(batches)
        yield from batches


def encode_batch(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``prompt + completion + <eos>``; labels are -100 on the prompt and the padding."""
    seqs, labels = [], []
    for row in rows:
        p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    lab = torch.tensor([[-100] * (width - len(s)) + s for s in labels])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, lab, mask


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], *, samples: int = 0, seed: int = 0, chunk: int = 128) -> dict:
    """Held-out greedy accuracy (overall and on the planted slice); with ``samples``, sampled
    (temperature 1) accuracy too."""
    from .rewards import MathCorrectness
    from .rollout import HFGenerateEngine

    engine = HFGenerateEngine(model, tokenizer)
    reward = MathCorrectness()
    greedy, sampled = [], []
    torch.manual_seed(seed)
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        prompts, answers = [r["prompt"] for r in part], [r["answer"] for r in part]
        out = engine.generate(prompts, num_samples=1, max_new_tokens=MAX_NEW_TOKENS, greedy=True)
        greedy += reward(out.prompts, out.completions, answer=answers)
        if samples:
            out = engine.generate(prompts, num_samples=samples, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0)
            sampled += reward(out.prompts, out.completions, answer=[a for a in answers for _ in range(samples)])
    in_slice = [r["slice"] != "" for r in rows]
    sl = [g for g, s in zip(greedy, in_slice) if s]
    out = {"greedy": sum(greedy) / len(greedy), "slice_greedy": sum(sl) / max(len(sl), 1)}
    if samples:
        out["sampled"] = sum(sampled) / len(sampled)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "assets", "tiny-arith"))
    ap.add_argument("--max-steps", type=int, default=1500, help="upper bound on optimizer steps")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    ap.add_argument("--decay-steps", type=int, default=3000, help="horizon of the cosine decay to 10%% of --lr")
    ap.add_argument("--planted-frac", type=float, default=0.15, help="share of planted-slice problems")
    ap.add_argument("--target", type=float, default=0.45, help="held-out greedy accuracy of the snapshot kept")
    ap.add_argument("--stop-above", type=float, default=0.55, help="stop once held-out greedy accuracy passes this")
    ap.add_argument("--eval-from", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-prompts", type=int, default=500, help="held-out problems evaluated for the choice")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import copy

    torch.set_num_threads(args.threads)
    _, eval_rows = addition_task()
    held_out = {problem_key([int(x) for x in r["prompt"][8:-1].split("+")]) for r in eval_rows}
    eval_rows = eval_rows[:args.eval_prompts]
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, parameters {n_params:,}, held out {len(held_out)}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.55 + 0.45 * math.cos(math.pi * min(1.0, s / args.decay_steps))))
    batches = warmup_batches(random.Random(args.seed), held_out, batch_size=args.batch_size,
                             planted_frac=args.planted_frac)
    t0 = time.perf_counter()
    curve, best = [], None
    for step in range(1, args.max_steps + 1):
        model.train()
        ids, labels, mask = encode_batch(tokenizer, next(batches))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= args.eval_from and (step - args.eval_from) % args.eval_every == 0:
            model.eval()
            acc = evaluate(model, tokenizer, eval_rows)
            point = {"step": step, "loss": round(loss.item(), 4), **{k: round(v, 4) for k, v in acc.items()},
                     "seconds": round(time.perf_counter() - t0, 1)}
            curve.append(point)
            print(json.dumps(point), flush=True)
            if best is None or abs(acc["greedy"] - args.target) < abs(best[0]["greedy"] - args.target):
                best = (point, copy.deepcopy(model.state_dict()))
            if acc["greedy"] > args.stop_above:
                break
    if best is None:
        raise SystemExit("no evaluation ran: --max-steps must reach --eval-from")
    model.load_state_dict(best[1])
    model.eval()
    final = evaluate(model, tokenizer, eval_rows, samples=2, seed=args.seed)
    save(model, tokenizer, args.out)
    info = {"chosen_step": best[0]["step"], "held_out_prompts": len(eval_rows), "chosen_eval": final,
            "curve": curve, "parameters": n_params, "seconds": round(time.perf_counter() - t0, 1),
            "command": "python -m entropy_ops.trainers.make_tiny_model", "args": dict(vars(args))}
    info["args"]["out"] = os.path.basename(args.out)
    with open(os.path.join(args.out, "warmup.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    print(json.dumps({k: info[k] for k in ("chosen_step", "chosen_eval", "seconds")}))


def save(model, tokenizer, out: str) -> None:
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    main()
