"""A Hugging Face causal LM on the fused op: its training loss and its RL log-probs, no [B, T, V] logits.

Needs the ``train`` extra (transformers):

    pip install -e ".[train]"        # from a clone; or: pip install "entropy-ops[train]"
    python examples/hf_logprobs.py

Runs on the CPU in seconds with a tiny random Qwen2 (tied embeddings) built from a config, no
download. With a real model, replace ``tiny_model()`` by ``AutoModelForCausalLM.from_pretrained(...)``
(any causal LM whose output layer is an ``nn.Linear``, vision-language models included; see
docs/integrations.md). On a CUDA device the fused op runs the Triton kernels; on the CPU its
chunked PyTorch path.
"""
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import entropy_ops
from entropy_ops.integrations.hf import compute_logprobs_and_entropy


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=151, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).eval()


def main():
    model = tiny_model()
    # Two rows: [prompt | completion], the first prompt left-padded, the second completion right-padded.
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    completion_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    completion_mask[:, 6:] = True
    completion_mask[1, 10:] = False
    labels = torch.where(completion_mask, input_ids, -100)  # SFT: loss on the completion only

    stock = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    logits = stock.logits.detach()

    # 1. Supervised loss: one line, then the usual call; the loss is the same, the logits are not built.
    entropy_ops.patch(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    print(f"SFT loss: patched {out.loss.item():.6f}, stock {stock.loss.item():.6f}, logits={out.logits}")
    loss_err = abs(out.loss.item() - stock.loss.item())

    # 2. RL: per-token log-probs and entropies of the completion at a temperature.
    logp, entropy = compute_logprobs_and_entropy(model, input_ids, attention_mask, completion_mask,
                                                 temperature=0.9)
    # logp[b, t] = log p(input_ids[b, t] | input_ids[b, :t]); 0 outside the completion.
    print("log-probs of the completion tokens:\n", logp[:, 6:])
    print("entropies (nats):\n", entropy[:, 6:])
    ref = torch.log_softmax(logits[:, :-1].double() / 0.9, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    err = (logp[:, 1:].double() - ref)[completion_mask[:, 1:]].abs().max().item()
    print(f"max |difference| to log_softmax(stock logits / 0.9): {err:.2e}")

    # Differentiable: e.g. a REINFORCE-style step with an entropy bonus.
    advantages = torch.tensor([1.0, -0.5])
    n = completion_mask.sum()
    loss = -(advantages[:, None] * logp).sum() / n - 0.01 * entropy.sum() / n
    loss.backward()
    print("grad norm of the (tied) embedding:", model.get_input_embeddings().weight.grad.norm().item())
    return max(err, loss_err)


if __name__ == "__main__":
    main()
