"""``VLLMEngine`` against a fake ``vllm`` module (vLLM itself needs a CUDA GPU), and ``make_engine``.

The fake honours the parts of vLLM's interface the engine uses: ``LLM(**kwargs)``,
``LLM.generate([{"prompt_token_ids": ...}], SamplingParams | [SamplingParams], use_tqdm=)``
returning request outputs whose ``.outputs[j]`` carry ``token_ids``, ``finish_reason``
and ``index``, with vLLM's stopping rule (stop after a ``stop_token_ids`` token, kept
in ``token_ids``; else after ``max_tokens`` tokens with ``finish_reason="length"``),
``LLM.apply_model`` / the V0 ``llm_engine.model_executor.driver_worker.model_runner.model``
path with ``load_weights``, and ``reset_prefix_cache``. Token streams are scripted per
prompt and sample, so every expected tensor is known by hand. The tokenizer and model
are the embedded ``tiny-arith`` (eos id 1, pad id 0, one token per character).
"""
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from entropy_ops.trainers.model import tiny_model_path
from entropy_ops.trainers.rollout import (ROLLOUT_ENGINES, HFGenerateEngine, check_engine_options, make_engine,
                                          pack_completions)
from entropy_ops.trainers.vllm_engine import VLLM_OPTIONS, VLLMEngine, vllm_parameter_name

EOS, PAD = 1, 0
BOXED, CLOSE = 3, 29  # "\boxed{" and "}" (checked against the tokenizer in test_token_ids)


def digit(d: int) -> int:
    return 4 + d  # "0".."9" are ids 4..13


@pytest.fixture(scope="module")
def tiny():
    path = tiny_model_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_token_ids(tiny):
    _, tokenizer = tiny
    assert tokenizer.convert_ids_to_tokens([EOS, PAD, BOXED, CLOSE, digit(0), digit(9)]) == [
        "<eos>", "<pad>", "\\boxed{", "}", "0", "9"]
    assert tokenizer.eos_token_id == EOS and tokenizer.pad_token_id == PAD


# ---------------------------------------------------------------------------------------- the fake vllm
class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.__dict__.update(kwargs)


class FakeVLLMModel:
    def __init__(self):
        self.loads = []  # one list of (name, tensor) per load_weights call

    def load_weights(self, weights):
        self.loads.append([(name, tensor.clone()) for name, tensor in weights])


class FakeLLM:
    """``script[(tuple(prompt_token_ids), j)]`` is sample ``j``'s raw token stream for that prompt."""

    script: dict = {}
    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.model = FakeVLLMModel()
        self.generate_calls = []
        self.prefix_cache_resets = 0
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.generate_calls.append((prompts, sampling_params))
        outputs = []
        for i, prompt in enumerate(prompts):
            params = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
            samples = []
            for j in range(params.n):
                stream = self.script[(tuple(prompt["prompt_token_ids"]), j)]
                tokens, reason = [], "length"
                for t in stream:
                    tokens.append(t)
                    if t in (params.stop_token_ids or []):
                        reason = "stop"
                        break
                    if len(tokens) == params.max_tokens:
                        break
                samples.append(types.SimpleNamespace(index=j, token_ids=tuple(tokens), finish_reason=reason))
            outputs.append(types.SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=samples))
        return outputs

    def apply_model(self, func):
        return [func(self.model)]

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1
        return True


class FakeV0LLM(FakeLLM):
    """An older vLLM: no ``apply_model``; the model sits behind ``llm_engine.model_executor.driver_worker``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        runner = types.SimpleNamespace(model=self.model)
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner)))

    apply_model = None


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(FakeLLM, "script", {})
    monkeypatch.setattr(FakeLLM, "instances", [])
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "unset")  # restored after the test
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    return module


def prompt_key(tokenizer, prompt: str) -> tuple:
    return tuple(tokenizer(prompt)["input_ids"])


# ---------------------------------------------------------------------------------------- layout
PROMPTS = ["What is 3+4?", "What is 12+345?"]
# Two samples per prompt; rows 0..3 in prompt-major order. Tokens after an end token never reach the
# rollout (vLLM stops there; HF pads after it).
STREAMS = [
    [BOXED, digit(7), CLOSE, EOS, digit(9), digit(9)],  # row 0: ends at step 4
    [digit(1), digit(2), digit(3), digit(4), digit(5), digit(6), EOS],  # row 1: cut by max_new_tokens = 5
    [EOS, digit(2)],  # row 2: ends at once
    [BOXED, digit(3), digit(5), digit(7), CLOSE],  # row 3: exactly max_new_tokens tokens, no end token
]
MAX_NEW = 5
EXPECTED_IDS = [
    [BOXED, digit(7), CLOSE, EOS, PAD],
    [digit(1), digit(2), digit(3), digit(4), digit(5)],
    [EOS, PAD, PAD, PAD, PAD],
    [BOXED, digit(3), digit(5), digit(7), CLOSE],
]
EXPECTED_MASK = [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
EXPECTED_TRUNCATED = [False, True, False, True]
EXPECTED_TEXTS = ["\\boxed{7}", "12345", "", "\\boxed{357}"]


def script_streams(tokenizer, prompts, streams, num_samples):
    FakeLLM.script.update({(prompt_key(tokenizer, p), j): streams[i * num_samples + j]
                           for i, p in enumerate(prompts) for j in range(num_samples)})


def hf_generate_returning(streams, max_new_tokens):
    """A ``model.generate`` stand-in that returns what transformers returns for these token streams."""

    def generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=None,
                 **_):
        # a row runs through its first end token or max_new_tokens; generate stops when every row has,
        # and pads the finished rows with pad_token_id
        lengths = [next((i + 1 for i, t in enumerate(s[:max_new_tokens]) if t in eos_token_id), max_new_tokens)
                   for s in streams]
        width = max(lengths)
        gen = torch.tensor([s[:n] + [pad_token_id] * (width - n) for s, n in zip(streams, lengths)])
        return torch.cat([input_ids, gen], dim=1)

    return generate


def test_rollout_layout_matches_hf_engine(tiny, fake_vllm, monkeypatch):
    model, tokenizer = tiny
    script_streams(tokenizer, PROMPTS, STREAMS, 2)
    vllm_rollout = VLLMEngine(model, tokenizer).generate(PROMPTS, num_samples=2, max_new_tokens=MAX_NEW,
                                                         temperature=0.9)
    monkeypatch.setattr(model, "generate", hf_generate_returning(STREAMS, MAX_NEW))
    hf_rollout = HFGenerateEngine(model, tokenizer).generate(PROMPTS, num_samples=2, max_new_tokens=MAX_NEW,
                                                             temperature=0.9)

    # the hand-written layout
    enc = [tokenizer(p)["input_ids"] for p in PROMPTS]
    width = max(map(len, enc))
    assert len(enc[0]) < width  # the first prompt really is left-padded
    expected_prompt = torch.tensor([[PAD] * (width - len(e)) + e for e in enc for _ in range(2)])
    expected_prompt_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc for _ in range(2)]).bool()
    assert torch.equal(vllm_rollout.prompt_ids, expected_prompt)
    assert torch.equal(vllm_rollout.prompt_mask, expected_prompt_mask)
    assert torch.equal(vllm_rollout.completion_ids, torch.tensor(EXPECTED_IDS))
    assert torch.equal(vllm_rollout.completion_mask, torch.tensor(EXPECTED_MASK).bool())
    assert vllm_rollout.truncated.tolist() == EXPECTED_TRUNCATED
    assert vllm_rollout.completions == EXPECTED_TEXTS
    assert vllm_rollout.prompts == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert vllm_rollout.completion_lengths.tolist() == [4, 5, 1, 5]

    # ... and field by field what HFGenerateEngine gives for the same tokens
    assert vllm_rollout.prompts == hf_rollout.prompts and vllm_rollout.completions == hf_rollout.completions
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
        a, b = getattr(vllm_rollout, field), getattr(hf_rollout, field)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), field

    # vLLM received each prompt once, unpadded, with n = num_samples
    (requests, params), = FakeLLM.instances[-1].generate_calls
    assert [r["prompt_token_ids"] for r in requests] == enc
    assert params.n == 2 and params.max_tokens == MAX_NEW and params.stop_token_ids == [EOS]
    assert params.detokenize is False


def test_all_rows_end_early_gives_narrow_completions(tiny, fake_vllm):
    model, tokenizer = tiny
    streams = [[digit(4), EOS, digit(1)], [EOS]]
    script_streams(tokenizer, ["What is 2+2?"], streams, 2)
    r = VLLMEngine(model, tokenizer).generate(["What is 2+2?"], num_samples=2, max_new_tokens=16)
    assert torch.equal(r.completion_ids, torch.tensor([[digit(4), EOS], [EOS, PAD]]))
    assert r.completion_mask.tolist() == [[True, True], [True, False]]
    assert r.truncated.tolist() == [False, False]
    assert r.completions == ["4", ""]


def test_rows_grouped_contiguously_by_prompt(tiny, fake_vllm):
    model, tokenizer = tiny
    prompts, k = ["What is 1+1?", "What is 22+3?", "What is 9*9?"], 3
    # row r = prompt i * k + sample j starts with a token that encodes r
    streams = [[4 + r, EOS] for r in range(len(prompts) * k)]
    script_streams(tokenizer, prompts, streams, k)
    r = VLLMEngine(model, tokenizer).generate(prompts, num_samples=k, max_new_tokens=4)
    assert r.completion_ids[:, 0].tolist() == [4 + i for i in range(9)]
    assert r.prompts == [p for p in prompts for _ in range(k)]
    for i, p in enumerate(prompts):
        rows = slice(i * k, (i + 1) * k)
        assert (r.prompt_ids[rows][r.prompt_mask[rows]].view(k, -1) == torch.tensor(tokenizer(p)["input_ids"])).all()
    assert r.completions == [str(i) for i in range(9)]


def test_sampling_params(tiny, fake_vllm):
    model, tokenizer = tiny
    script_streams(tokenizer, ["What is 3+4?"], [[EOS]] * 4, 4)
    engine = VLLMEngine(model, tokenizer)
    llm = FakeLLM.instances[-1]

    engine.generate(["What is 3+4?"], num_samples=1, max_new_tokens=7, temperature=1.3, top_p=0.8, top_k=20,
                    greedy=True)
    greedy = llm.generate_calls[-1][1]
    assert (greedy.temperature, greedy.top_p, greedy.top_k, greedy.n, greedy.max_tokens) == (0.0, 1.0, -1, 1, 7)

    engine.generate(["What is 3+4?"], num_samples=4, max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=0)
    sampled = llm.generate_calls[-1][1]
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.n, sampled.max_tokens) == (0.7, 0.9, -1, 4, 9)
    assert "seed" not in sampled.kwargs

    engine.generate(["What is 3+4?"], num_samples=2, max_new_tokens=3, temperature=1.0, top_p=1.0, top_k=5)
    assert llm.generate_calls[-1][1].top_k == 5

    with pytest.raises(ValueError, match="num_samples"):
        engine.generate(["What is 3+4?"], num_samples=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(["What is 3+4?"], max_new_tokens=0)


def test_sampling_seed_gives_one_seed_per_request(tiny, fake_vllm):
    model, tokenizer = tiny
    prompts = ["What is 3+4?", "What is 5+6?"]
    script_streams(tokenizer, prompts, [[EOS]] * 4, 2)
    engine = VLLMEngine(model, tokenizer, sampling_seed=100)
    llm = FakeLLM.instances[-1]
    engine.generate(prompts, num_samples=2, max_new_tokens=3)
    engine.generate(prompts, num_samples=2, max_new_tokens=3)
    first, second = llm.generate_calls[0][1], llm.generate_calls[1][1]
    assert [p.seed for p in first] == [100, 101] and [p.seed for p in second] == [102, 103]
    assert all(p.n == 2 and p.temperature == 1.0 for p in first + second)


def test_llm_construction_passes_options(tiny, fake_vllm):
    model, tokenizer = tiny
    VLLMEngine(model, tokenizer)
    defaults = FakeLLM.instances[-1].kwargs
    assert defaults["model"] == model.name_or_path == tiny_model_path()
    assert defaults["dtype"] == "float32" and defaults["gpu_memory_utilization"] == 0.3
    assert defaults["tensor_parallel_size"] == 1 and isinstance(defaults["seed"], int)
    assert "enable_prefix_caching" not in defaults and "max_model_len" not in defaults
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"

    make_engine("vllm", model, tokenizer, gpu_memory_utilization=0.5, dtype="bfloat16", enable_prefix_caching=False,
                max_model_len=64, seed=7, enforce_eager=True, model_path="/some/checkpoint")
    given = FakeLLM.instances[-1].kwargs
    assert given == dict(model="/some/checkpoint", gpu_memory_utilization=0.5, tensor_parallel_size=1,
                         dtype="bfloat16", seed=7, trust_remote_code=False, enable_prefix_caching=False,
                         max_model_len=64, enforce_eager=True)


@pytest.mark.parametrize("llm_class", [FakeLLM, FakeV0LLM], ids=["apply_model", "v0_driver_worker"])
def test_update_weights_pushes_every_parameter(tiny, fake_vllm, llm_class):
    model, tokenizer = tiny
    fake_vllm.LLM = llm_class
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path())  # a copy this test may change
    engine = VLLMEngine(policy, tokenizer)
    llm = FakeLLM.instances[-1]
    assert type(llm) is llm_class
    assert len(llm.model.loads) == 1 and llm.prefix_cache_resets == 1  # synced once at construction

    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # an "optimizer step"
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    engine.update_weights(policy)
    assert len(llm.model.loads) == 2 and llm.prefix_cache_resets == 2
    loaded = llm.model.loads[-1]
    named = list(policy.named_parameters())
    assert [n for n, _ in loaded] == [n for n, _ in named]
    assert len(loaded) == 50 and "model.embed_tokens.weight" in dict(loaded)  # lm_head tied: listed once
    for (name, sent), (_, param) in zip(loaded, named):
        assert sent.shape == param.shape and torch.equal(sent, param.detach()), name
    assert not torch.equal(loaded[0][1], llm.model.loads[0][0][1])  # the new values, not the loaded ones


def test_vllm_parameter_name_strips_wrappers():
    assert (vllm_parameter_name("module._orig_mod.model.layers.0.mlp.up_proj.weight")
            == "model.layers.0.mlp.up_proj.weight")
    assert (vllm_parameter_name("model.layers.1._checkpoint_wrapped_module.self_attn.q_proj.bias")
            == "model.layers.1.self_attn.q_proj.bias")
    assert vllm_parameter_name("lm_head.weight") == "lm_head.weight"
    assert vllm_parameter_name("model.submodule.weight") == "model.submodule.weight"  # only whole components go


def test_missing_vllm_import_error(tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "entropy-ops\[vllm\]"'):
        make_engine("vllm", model, tokenizer)
    with pytest.raises(ImportError, match=r'pip install "entropy-ops\[vllm\]"'):
        VLLMEngine(model, tokenizer, gpu_memory_utilization=0.4)


def test_make_engine_errors(tiny, fake_vllm):
    model, tokenizer = tiny
    assert ROLLOUT_ENGINES == ("hf", "vllm")
    with pytest.raises(ValueError, match=r"rollout_engine: unknown engine 'sglang'; expected one of 'hf', 'vllm'"):
        make_engine("sglang", model, tokenizer)
    with pytest.raises(ValueError, match=r"rollout_engine_options: unknown option\(s\) temperature for "
                                         r"rollout_engine='hf'; allowed: none"):
        make_engine("hf", model, tokenizer, temperature=1.0)
    with pytest.raises(ValueError, match=r"rollout_engine_options: unknown option\(s\) gpu_mem, tp for "
                                         r"rollout_engine='vllm'; allowed: model_path, gpu_memory_utilization"):
        make_engine("vllm", model, tokenizer, tp=2, gpu_mem=0.5)
    with pytest.raises(ValueError, match=r"rollout_engine_options\.gpu_memory_utilization"):
        make_engine("vllm", model, tokenizer, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match=r"rollout_engine_options\.tensor_parallel_size"):
        make_engine("vllm", model, tokenizer, tensor_parallel_size=0)
    with pytest.raises(TypeError, match=r"rollout_engine_options: expected a dict"):
        check_engine_options("vllm", [("seed", 1)])
    check_engine_options("vllm", {name: None for name in VLLM_OPTIONS})  # every documented option is accepted
    assert FakeLLM.instances == []  # nothing was built by the failing calls


def test_make_engine_hf_and_its_noop_update_weights(tiny):
    model, tokenizer = tiny
    engine = make_engine("hf", model, tokenizer)
    assert type(engine) is HFGenerateEngine and engine.model is model and engine.tokenizer is tokenizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = engine.generate(["What is 3+4?"], max_new_tokens=6, greedy=True)
    assert engine.update_weights(model) is None
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    second = engine.generate(["What is 3+4?"], max_new_tokens=6, greedy=True)
    assert torch.equal(first.completion_ids, second.completion_ids) and first.completions == second.completions


def test_pack_completions():
    ids, mask, truncated = pack_completions(
        [[5, 6, 2, 7], [8, 9, 9], [], [4]], eos_ids=[2, 3], pad_id=0, stopped=[True, False, False, True])
    assert ids.tolist() == [[5, 6, 2], [8, 9, 9], [0, 0, 0], [4, 0, 0]]
    assert mask.tolist() == [[True] * 3, [True] * 3, [False] * 3, [True, False, False]]
    # row 3 has no end token but the engine stopped it (another stop token): it ended
    assert truncated.tolist() == [False, True, True, False]
    ids, mask, truncated = pack_completions([[3, 3, 3]], eos_ids=[2, 3], pad_id=0)
    assert ids.tolist() == [[3]] and mask.tolist() == [[True]] and truncated.tolist() == [False]
    ids, mask, truncated = pack_completions([], eos_ids=[2], pad_id=0)
    assert ids.shape == (0, 0) and truncated.shape == (0,)


# ------------------------------------------------------------------ the trainer on the vLLM engine
class SamplingFakeLLM(FakeLLM):
    """A fake that really samples: its own copy of the model (loaded from ``LLM(model=path)``), kept in step with
    the policy only through ``load_weights``, so a broken weight sync shows up as diverging weights."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hf = AutoModelForCausalLM.from_pretrained(kwargs["model"]).eval()
        owner = self

        class Loader:
            def load_weights(self, weights):
                state = owner.hf.state_dict()
                with torch.no_grad():
                    for name, tensor in weights:
                        state[name].copy_(tensor)
                owner.loads += 1

        self.model, self.loads = Loader(), 0

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        outputs = []
        for i, prompt in enumerate(prompts):
            params = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
            ids = torch.tensor([prompt["prompt_token_ids"]])
            greedy = params.temperature == 0
            out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=not greedy,
                                   num_return_sequences=params.n, max_new_tokens=params.max_tokens,
                                   eos_token_id=list(params.stop_token_ids), pad_token_id=PAD,
                                   **({} if greedy else {"temperature": params.temperature}))
            samples = []
            for j, row in enumerate(out[:, ids.shape[1]:].tolist()):
                tokens = []
                for t in row:
                    tokens.append(t)
                    if t in params.stop_token_ids:
                        break
                reason = "stop" if tokens[-1] in params.stop_token_ids else "length"
                samples.append(types.SimpleNamespace(index=j, token_ids=tuple(tokens), finish_reason=reason))
            outputs.append(types.SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=samples))
        return outputs


def test_trainer_trains_with_the_vllm_engine_and_keeps_it_in_sync(tmp_path, monkeypatch):
    from entropy_ops.trainers.config import TrainConfig
    from entropy_ops.trainers.grpo_trainer import Trainer

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = SamplingFakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    # A reward that differs between the samples of every group whatever the model answers (a confident model
    # may sample one string G times), so every step has a signal.
    rewards = types.ModuleType("entropy_ops_vllm_test_rewards")
    rewards.digits = lambda prompts, completions, **_: [float(i % 2) for i in range(len(completions))]
    monkeypatch.setitem(sys.modules, rewards.__name__, rewards)
    threads = torch.get_num_threads()
    config = TrainConfig.from_dict(dict(
        rewards={"correctness": 1.0, "entropy_ops_vllm_test_rewards:digits": 1.0},
        rollout_engine="vllm", rollout_engine_options={"gpu_memory_utilization": 0.5}, num_prompts=2, group_size=4,
        max_new_tokens=6, num_eval_prompts=4, eval_samples=1, eval_every=0, save_every=0, max_steps=2,
        learning_rate=1e-3, device="cpu", plot=False, output_dir=str(tmp_path / "run")))
    trainer = Trainer(config)
    try:
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        summary = trainer.train()
    finally:
        torch.set_num_threads(threads)
    llm = trainer.engine.llm if hasattr(trainer.engine, "llm") else None
    llm = llm or next(v for v in vars(trainer.engine).values() if isinstance(v, SamplingFakeLLM))
    assert summary["steps"] == 2 and summary["last_eval"] is not None
    assert llm.kwargs["gpu_memory_utilization"] == 0.5
    assert llm.loads == 3  # at start, then after each of the 2 optimizer steps
    changed = 0
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(llm.hf.state_dict()[name], value, rtol=0, atol=0)
        changed += not torch.equal(before[name], value)
    assert changed > 0  # training moved the policy, and the engine followed
