"""End-to-end smoke test of the trainer on the embedded tiny model (CPU, a few steps), and its parts.

- 2 steps: finite loss, parameters changed, checkpoints, JSONL log and plot written;
- Ctrl-C after step 1 saves a checkpoint; ``resume`` continues to step 2 and ends
  bit-for-bit where the uninterrupted run ended;
- the fused scoring pass (hidden states at completion positions -> lm_head via
  the fused op) equals a float64 log-softmax of the model's own logits, with
  left-padded prompts of different lengths.
"""
import copy
import json
import math
import os
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from entropy_ops.trainers.checkpoint import STATE_FILE, list_checkpoints, load_state
from entropy_ops.trainers.config import TrainConfig
from entropy_ops.trainers.grpo_trainer import Trainer, lr_factor
from entropy_ops.trainers.model import tiny_model_path
from entropy_ops.trainers.rollout import completion_mask_from_ids, sequence_inputs
from entropy_ops.trainers.tasks import PromptSampler, arithmetic_task

# A reward that varies between completions whatever the model, so every group carries a learning signal.
DIGITS_REWARD = "entropy_ops_test_rewards:digit_fraction"
SMALL = dict(rewards={"correctness": 1.0, DIGITS_REWARD: 0.5}, num_prompts=4, group_size=4, max_new_tokens=8, micro_batch_size=6, num_eval_prompts=6, eval_samples=2,
             eval_every=0, save_every=1, learning_rate=1e-3, log_every=1, seed=3, temperature=1.2)


@pytest.fixture(autouse=True, scope="module")
def restore_torch_threads():
    """The trainer sets torch's (process-wide) thread count (1 for the tiny model): give other modules theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def digit_reward(monkeypatch):
    module = types.ModuleType(DIGITS_REWARD.split(":")[0])
    module.digit_fraction = lambda prompts, completions, **_: [sum(ch.isdigit() for ch in c) / max(len(c), 1)
                                                               for c in completions]
    monkeypatch.setitem(sys.modules, module.__name__, module)


def _run(tmp_path, name, **overrides):
    config = TrainConfig.from_dict({**SMALL, "output_dir": str(tmp_path / name), **overrides})
    trainer = Trainer(config)
    return trainer, trainer.train()


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_two_steps_then_interrupt_and_resume(tmp_path, ctrl_c_after_each_step):
    torch.manual_seed(0)
    initial = load_file(os.path.join(tiny_model_path(), "model.safetensors"))

    # Uninterrupted: 2 steps.
    trainer, summary = _run(tmp_path, "straight", max_steps=2)
    assert summary["steps"] == 2 and not summary["interrupted"]
    rows = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    for r in train_rows:
        for key in ("loss/loss", "reward/mean", "advantage/std", "entropy", "grad_norm", "throughput/tokens_per_s",
                    "memory/peak_rss_mib", "reward/correctness/mean", "completion_length/mean"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, r[key])
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2]
    final = _params(trainer.model)
    changed = [k for k in initial if not torch.equal(initial[k], final[k])]
    assert changed, "no parameter changed in 2 steps"
    saved = list_checkpoints(str(tmp_path / "straight"))
    assert [s for s, _ in saved] == [1, 2]
    assert os.path.isfile(os.path.join(saved[-1][1], "model.safetensors"))
    assert load_state(saved[-1][1])["step"] == 2
    assert os.path.isfile(tmp_path / "straight" / "metrics.png")
    assert not [n for n in os.listdir(tmp_path / "straight") if n.startswith(".checkpoint")]  # no temp dirs left

    # Ctrl-C during step 1: the step finishes, a checkpoint is saved, the run stops.
    restore = ctrl_c_after_each_step()
    _, summary = _run(tmp_path, "resumed", max_steps=2, save_every=0)
    assert summary["interrupted"] and summary["steps"] == 1
    assert [s for s, _ in list_checkpoints(str(tmp_path / "resumed"))] == [1]
    restore()

    # Resume: continues at step 2 and ends where the uninterrupted run ended.
    trainer, summary = _run(tmp_path, "resumed", max_steps=2, save_every=0, resume=True)
    assert trainer.resumed_from.endswith("checkpoint-000001")
    assert summary["steps"] == 2 and not summary["interrupted"]
    resumed = _params(trainer.model)
    for k in final:
        assert torch.equal(final[k], resumed[k]), f"{k} differs after resume"
    steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "metrics.jsonl")
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2]


def test_reference_model_dynamic_sampling_and_iterations(tmp_path):
    """Dr.GRPO with a KL term (a reference model), dynamic sampling and 2 optimizer passes per batch."""
    trainer, summary = _run(tmp_path, "variants", algo="dr_grpo", dynamic_sampling=True, num_iterations=2,
                            loss={"beta": 0.05}, max_steps=1, save_every=0, plot=False)
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert trainer.loss_config.aggregation == "seq-mean-token-sum-norm" and trainer.loss_config.beta == 0.05
    row = [json.loads(line) for line in open(tmp_path / "variants" / "metrics.jsonl")][1]
    assert row["kind"] == "train" and 0 < row["dynamic_sampling/kept_frac"] <= 1
    for key in ("loss/kl_ref", "loss/ratio_max", "loss/approx_kl", "loss/loss"):
        assert math.isfinite(row[key]), key
    assert row["loss/kl_ref"] > 0  # the second pass moved the policy away from the reference
    assert summary["steps"] == 1


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A trainer that never trains (its parts are tested), scoring at temperature 0.7."""
    out = tmp_path_factory.mktemp("parts")
    return Trainer(TrainConfig.from_dict({**SMALL, "rewards": {"correctness": 1.0}, "output_dir": str(out),
                                          "temperature": 0.7}))


def test_fused_scoring_matches_model_logits(trainer):
    """Left-padded prompts of different lengths: the fused pass equals log_softmax of the model's logits."""
    torch.manual_seed(1)
    rollout = trainer.engine.generate(["What is 3+4?", "What is 12+345?", "What is 99+1?"], num_samples=2,
                                      max_new_tokens=6, temperature=1.5)
    assert rollout.prompt_mask[:, 0].tolist() != rollout.prompt_mask[:, -1].tolist()  # prompts really padded
    logp, H = trainer.score(trainer.model, rollout)
    mask = rollout.completion_mask
    model64 = copy.deepcopy(trainer.model).double()
    for i in range(len(rollout.completions)):  # each row alone, unpadded, through the full model in float64
        ids = torch.cat([rollout.prompt_ids[i][rollout.prompt_mask[i]], rollout.completion_ids[i][mask[i]]])
        with torch.no_grad():
            logits = model64(input_ids=ids[None]).logits[0]
        n_prompt = int(rollout.prompt_mask[i].sum())
        z = logits[n_prompt - 1:-1] / 0.7
        logq = torch.log_softmax(z, -1)
        want_logp = logq.gather(-1, ids[n_prompt:, None])[:, 0]
        want_H = -(logq.exp() * logq).sum(-1)
        n = int(mask[i].sum())
        torch.testing.assert_close(logp[i, :n].double(), want_logp, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(H[i, :n].double(), want_H, rtol=1e-5, atol=2e-5)
        assert torch.all(logp[i, n:] == 0) and torch.all(H[i, n:] == 0)


def test_completion_mask_stops_after_first_end_token():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    assert completion_mask_from_ids(ids, [1]).tolist() == [[True, True, False, False], [True] * 4,
                                                           [True, False, False, False]]
    ids2, attn, pos = sequence_inputs(torch.tensor([[0, 3, 4]]), torch.tensor([[False, True, True]]),
                                      torch.tensor([[9, 0]]), torch.tensor([[True, False]]))
    assert ids2.tolist() == [[0, 3, 4, 9, 0]] and attn.tolist() == [[0, 1, 1, 1, 0]]
    assert pos.tolist() == [[0, 0, 1, 2, 2]]


def test_arithmetic_task_split_and_sampler():
    train, held_out = arithmetic_task()
    assert len(train) == 7900 and len(held_out) == 200
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert held_out == arithmetic_task()[1]  # the split depends only on split_seed
    row = train[0]
    a, b = row["prompt"].removeprefix("What is ").removesuffix("?").split("+")
    assert int(row["answer"]) == int(a) + int(b)
    sampler = PromptSampler(train[:5], seed=0)
    first = sampler.sample(3)
    state = sampler.state_dict()
    rest = sampler.sample(9)
    sampler.load_state_dict(state)
    assert sampler.sample(9) == rest
    assert sorted(r["prompt"] for r in first + rest[:2]) == sorted(r["prompt"] for r in train[:5])  # an epoch


@pytest.mark.parametrize("schedule, want", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 2 / 3, 1 / 3]),  # step index 4 is the last step: it still learns
    ("cosine", [0.5, 1.0, 1.0, 0.75, 0.25]),
])
def test_lr_schedule(schedule, want):
    got = [lr_factor(s, warmup=2, total=5, schedule=schedule) for s in range(5)]
    assert got == pytest.approx(want)


def test_checkpoint_state_is_weights_only_loadable(trainer):
    path = trainer.save()
    state = torch.load(os.path.join(path, STATE_FILE), weights_only=True)
    assert set(state) >= {"optimizer", "scheduler", "sampler", "rng", "step"}


def test_embedded_tokenizer_loads_as_built():
    """The saved character-level tokenizer loads back as itself (not as the model type's Qwen2Tokenizer)."""
    from entropy_ops.trainers.make_tiny_model import build_tokenizer
    from entropy_ops.trainers.model import load_tokenizer

    loaded, built = load_tokenizer("tiny-arith"), build_tokenizer()
    for text in ["What is 37+48?\\boxed{85}", "a b\nc \\boxed{x}} Z"]:
        assert loaded(text)["input_ids"] == built(text)["input_ids"]
        # characters outside the vocabulary (newline, most capitals) become <unk>
        assert loaded.decode(loaded(text)["input_ids"]) == text.replace("Z", "<unk>").replace("\n", "<unk>")
    assert loaded.convert_ids_to_tokens(loaded("\\boxed{1}")["input_ids"]) == ["\\boxed{", "1", "}"]
    assert loaded.padding_side == "left" and loaded.pad_token == "<pad>" and loaded.eos_token == "<eos>"
