"""Every registered ``--algo`` trains end to end for 2 steps on the embedded tiny model (CPU)."""

import pytest
import torch

from entropy_ops.trainers.algorithms import ALGORITHMS
from entropy_ops.trainers.config import TrainConfig
from entropy_ops.trainers.grpo_trainer import Trainer

SMALL = dict(dataset="arithmetic", num_prompts=3, group_size=4, max_new_tokens=16, micro_batch_size=6, num_eval_prompts=4, eval_samples=1,
             eval_every=0, save_every=0, learning_rate=1e-3, log_every=1, seed=5, temperature=1.2, max_steps=2,
             plot=False)


@pytest.fixture(autouse=True, scope="module")
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_every_paper_algorithm_is_registered():
    assert {"grpo", "dr-grpo", "rloo", "gtpo", "grpo-s", "seed-grpo", "em-ft", "em-rl"} <= set(ALGORITHMS)


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_two_steps(tmp_path, algo):
    config = TrainConfig.from_dict({**SMALL, "algo": algo, "output_dir": str(tmp_path / algo)})
    trainer = Trainer(config)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{algo}: no parameter changed"
    rows = [line for line in (tmp_path / algo / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert rows, f"{algo}: nothing logged"
    for line in rows:
        assert "NaN" not in line and "Infinity" not in line, f"{algo}: non-finite metric in {line[:200]}"
