"""GRPO with TRL, with entropy-ops computing the log-probs, entropies and the policy loss.

``FusedGRPOTrainer`` is a drop-in for ``trl.GRPOTrainer``: same arguments, plus ``fused_backend``
and ``fused_loss``. Runs on the CPU in seconds with a tiny random Llama and a word-level
tokenizer built here (no download); the reward asks for the word ``w7``:

    python examples/trl_grpo.py

With a real model, pass its name or the loaded model and its tokenizer as you would to
``GRPOTrainer``. Every GRPOConfig option trains as TRL computes it (loss types, vLLM
importance-sampling correction, bias-corrected KL, entropy bonus and mask, off-policy mask);
``trainer.fused_plan`` says what is fused, and a ``FusedFallbackWarning`` says when TRL's own code
runs instead (DeepSpeed ZeRO-3, an output layer entropy-ops cannot express). See docs/trl.md.
"""
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig

from entropy_ops.integrations.trl import FusedGRPOTrainer

VOCAB = 64


def tiny_tokenizer():
    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1)
    return LlamaForCausalLM(config)


def reward_w7(completions, **_):
    """Fraction of the completion's words that are ``w7``."""
    return [c.split().count("w7") / max(1, len(c.split())) for c in completions]


def main(max_steps: int = 2, one_pass: bool = True):
    dataset = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w8 w9", "w10"] * 4})
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=max_steps, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, learning_rate=1e-3, logging_steps=1,
                      epsilon_high=0.28, temperature=0.9, entropy_coef=0.01,
                      report_to=[], use_cpu=True, bf16=False, save_strategy="no", gradient_checkpointing=False)
    trainer = FusedGRPOTrainer(model=tiny_model(), reward_funcs=reward_w7, args=args, train_dataset=dataset,
                               processing_class=tiny_tokenizer(), fused_one_pass=one_pass)
    # "fused": log-probs, entropies and loss by entropy-ops; one_pass: the gradient formed in the forward
    print("entropy-ops path:", trainer.fused_plan.path, "one pass:", trainer.fused_plan.one_pass)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    for h in history:
        print({k: round(h[k], 4) for k in ("loss", "reward", "entropy", "clip_ratio/region_mean") if k in h})
    return history


if __name__ == "__main__":
    main()
