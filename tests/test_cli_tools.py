"""``entropy-ops compare`` (trainers/compare.py) and ``entropy-ops generate`` (trainers/generate.py).

- compare: two algorithms, one step each, run as separate processes; table, JSON and plot written; the
  summaries of a hand-written metrics log; unknown algorithm refused;
- generate: EM-INF through the CLI on the embedded model (``--compare`` writes both decodings; with
  ``--greedy`` EM-INF changes no completion, since it never moves the argmax); the prompt file formats;
  bad arguments refused with the argument's name.
"""
import json

import pytest
import torch

from entropy_ops.trainers import compare, generate
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
    rc = cli_main(["compare", "--algos", "grpo,em-rl", "--max-steps", "1", "--jobs", "2", "--output-dir", str(out),
                   *SMALL])
    assert rc == 0
    table = (out / "comparison.md").read_text()
    assert table.count("\n| grpo |") == 1 and table.count("\n| em-rl |") == 1
    data = json.loads((out / "comparison.json").read_text())
    assert data["meta"]["max_steps"] == 1 and data["meta"]["overrides"] == SMALL
    for algo in ("grpo", "em-rl"):
        assert data["runs"][algo]["returncode"] == 0
        s = data["summaries"][algo]
        assert s["steps"] == 1 and 0.0 <= s["reward/mean last"] <= 1.0 and s["entropy last"] > 0
        assert s["eval/greedy_correct first"] is not None and s["eval/greedy_correct last"] is not None
        config = (out / algo / "config.yaml").read_text()
        assert f"algo: {algo}" in config and "seed: 0" in config
    assert (out / "comparison.png").stat().st_size > 10_000
    assert "comparison.png" in capsys.readouterr().out


def test_summarize_hand_written_log(tmp_path):
    run = tmp_path / "algo"
    run.mkdir()
    rows = [{"step": 0, "kind": "eval", "eval/greedy_correct": 0.5, "eval/sampled_correct": 0.25,
             "eval/entropy": 0.4}]
    rows += [{"step": s, "kind": "train", "reward/mean": s / 10, "entropy": 1.0 / s, "completion_length/mean": 4.0}
             for s in range(1, 7)]
    rows += [{"step": 3, "kind": "train", "reward/mean": 0.0, "skipped": 1.0}]  # no entropy: skipped step, ignored
    rows += [{"step": 6, "kind": "eval", "eval/greedy_correct": 0.75, "eval/sampled_correct": 0.5,
              "eval/entropy": 0.2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = compare.summarize(str(run), window=2)
    assert s["steps"] == 6
    assert s["reward/mean first"] == pytest.approx((0.1 + 0.2) / 2)
    assert s["reward/mean last"] == pytest.approx((0.5 + 0.6) / 2)
    assert s["entropy last"] == pytest.approx((1 / 5 + 1 / 6) / 2)
    assert (s["eval/greedy_correct first"], s["eval/greedy_correct last"]) == (0.5, 0.75)
    table = compare.markdown_table({"algo": s, "missing": None}, {"algo": {"wall_s": 12.4}}, window=2)
    assert "| algo | 0.500 -> 0.750 | 0.250 -> 0.500 | 0.400 -> 0.200 | 0.150 -> 0.550 |" in table
    assert "| 12 s |" in table and "| missing | no log |" in table
    assert compare.summarize(str(tmp_path / "nothing")) is None


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
