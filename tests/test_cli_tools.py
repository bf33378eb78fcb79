"""``entropy-ops compare`` (trainers/compare.py) and ``entropy-ops generate`` (trainers/generate.py).

- compare: two algorithms (and the base model's evaluation), one step each, run as separate processes;
  table, JSON and plot written; a second call reuses the finished runs; the statistics of hand-written
  logs over two seeds (a superseded evaluation does not count); unknown algorithm refused;
- generate: EM-INF through the CLI on the embedded model (``--compare`` writes both decodings; with
  ``--greedy`` EM-INF changes no completion, since it never moves the argmax); the prompt file formats;
  bad arguments refused with the argument's name.
"""
import json

import pytest
import torch

from entropy_ops.trainers import compare, compare_report, generate
from entropy_ops.trainers.cli import main as cli_main

SMALL = ["--num_prompts=2", "--group_size=2", "--max_new_tokens=6", "--num_eval_prompts=4", "--eval_samples=1",
         "--eval_every=0", "--device=cpu"]


@pytest.fixture(autouse=True)
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_compare_runs_each_algorithm_and_reports(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--algos", "grpo,em-rl", "--max-steps", "1", "--jobs", "2", "--output-dir", str(out), *SMALL]
    assert cli_main(argv) == 0
    table = (out / "comparison.md").read_text()
    assert "| base model |" in table and "\n| grpo |" in table and "\n| em-rl |" in table
    data = json.loads((out / "comparison.json").read_text())
    assert data["meta"]["max_steps"] == 1 and data["meta"]["overrides"] == SMALL
    for name in ("base", "grpo", "em-rl"):
        assert data["runs"][f"{name}/seed0"]["returncode"] == 0
    for algo in ("grpo", "em-rl"):
        assert data["result"]["algos"][algo]["seeds_done"] == [0]
        assert 0.0 <= data["result"]["algos"][algo]["metrics"]["eval/greedy_correct"]["mean"] <= 1.0
        config = (out / algo / "seed0" / "config.yaml").read_text()
        assert f"algo: {algo}" in config and "seed: 0" in config
    assert (out / "comparison.png").stat().st_size > 10_000
    assert "comparison.png" in capsys.readouterr().out
    # Run again into the same folder: the finished runs are reused, none is refused or overwritten.
    logs = {p.name: p.read_text() for p in (out / "grpo" / "seed0").glob("metrics.jsonl")}
    assert cli_main(argv) == 0
    data = json.loads((out / "comparison.json").read_text())
    assert all(r.get("reused") for r in data["runs"].values())
    assert {p.name: p.read_text() for p in (out / "grpo" / "seed0").glob("metrics.jsonl")} == logs


def test_report_statistics_of_hand_written_logs(tmp_path):
    """Mean and paired gain over two seeds; an evaluation superseded by a resume does not count."""
    def write(name, seed, rows):
        rdir = tmp_path / name / f"seed{seed}"
        rdir.mkdir(parents=True)
        (rdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    for seed, (base_acc, grpo_acc) in enumerate([(0.5, 0.75), (0.25, 0.75)]):
        write("base", seed, [{"step": 0, "kind": "eval", "eval/greedy_correct": base_acc}])
        write("grpo", seed, [{"step": 1, "kind": "train", "reward/mean": 0.5},
                             {"step": 2, "kind": "eval", "eval/greedy_correct": 0.0},  # logged after the checkpoint
                             {"step": 1, "kind": "resume", "checkpoint": "checkpoint-000001"},
                             {"step": 2, "kind": "train", "reward/mean": 0.6},
                             {"step": 2, "kind": "eval", "eval/greedy_correct": grpo_acc}])
    result = compare_report.collect(str(tmp_path), ["grpo"], [0, 1], "grpo")
    grpo = result["algos"]["grpo"]
    assert grpo["metrics"]["eval/greedy_correct"]["mean"] == pytest.approx(0.75)
    gain = grpo["gain"]["eval/greedy_correct"]
    assert gain["mean"] == pytest.approx(0.375) and gain["values"] == pytest.approx([0.25, 0.5])
    assert gain["half"] == pytest.approx(12.706 * (0.25 / 2 ** 0.5) / 2 ** 0.5)  # t(0.975, 1) * sd / sqrt(n)
    assert [r["reward/mean"] for r in compare_report.train_rows(str(tmp_path / "grpo" / "seed0"))] == [0.5, 0.6]


def test_compare_refuses_unknown_algorithm(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compare.main(["--algos", "grpo,nope", "--output-dir", str(tmp_path)])
    assert e.value.code == 2
    assert "unknown algorithm 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------ generate
def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_generate_em_inf_compare_and_accuracy(tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    rc = cli_main(["generate", "--em-inf", "--compare", "--num-prompts", "6", "--max-new-tokens", "10",
                   "--n-steps", "3", "--delta", "0.1", "--device", "cpu", "--output", str(out), "--quiet"])
    assert rc == 0
    rows = _rows(out)
    assert [r["decoding"] for r in rows] == ["plain"] * 6 + ["em-inf"] * 6
    assert all(isinstance(r["correct"], float) for r in rows)
    printed = capsys.readouterr().out
    for label in ("plain", "em-inf"):
        acc = sum(r["correct"] for r in rows if r["decoding"] == label) / 6
        assert f"{label}: accuracy {acc:.3f}" in printed


def test_generate_greedy_em_inf_changes_nothing(tmp_path):
    out = tmp_path / "gen.jsonl"
    assert generate.main(["--em-inf", "--compare", "--greedy", "--num-prompts", "5", "--max-new-tokens", "10",
                          "--n-steps", "5", "--lr", "0.5", "--device", "cpu", "--output", str(out), "--quiet"]) == 0
    rows = _rows(out)
    plain = [r["completion"] for r in rows if r["decoding"] == "plain"]
    em = [r["completion"] for r in rows if r["decoding"] == "em-inf"]
    assert plain == em and len(plain) == 5 and any(plain)


def test_generate_prompt_file_formats(tmp_path, capsys):
    text = tmp_path / "prompts.txt"
    text.write_text("What is 12+30?\n\nWhat is 5+7?\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "What is 12+30?", "answer": "42"}) + "\n")
    args = generate.build_parser().parse_args(["--prompts-file", str(text)])
    assert generate.load_prompt_rows(args) == [{"prompt": "What is 12+30?"}, {"prompt": "What is 5+7?"}]
    args = generate.build_parser().parse_args(["--prompts-file", str(jsonl)])
    assert generate.load_prompt_rows(args) == [{"prompt": "What is 12+30?", "answer": "42"}]
    assert generate.main(["--prompts-file", str(text), "--adaptive-temperature", "--max-new-tokens", "4",
                          "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[adaptive-temperature]") == 2 and "accuracy" not in printed  # no answers: no accuracy


@pytest.mark.parametrize("argv,message", [
    (["--n-steps", "0"], "--n-steps must be >= 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--em-inf", "--delta", "-1"], "delta"),
])
def test_generate_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
