"""The run folder through the command line: nothing a user made is lost, errors are one line.

- a new run into a folder that holds a run (the reported case: 42 metric lines, checkpoints at
  higher steps) is refused before any model loads, naming --resume and --overwrite, and leaves
  every file byte for byte; --overwrite moves the old run aside (nothing deleted) and the new
  run's own checkpoint survives pruning;
- pruning deletes only the current run's checkpoints, never another run's (nor same-step ones);
- Ctrl-C: the checkpoint is saved, the held-out set is evaluated at the stop (a second Ctrl-C skips
  that, and the summary says no evaluation ran), the resume command is printed; running it prints
  the checkpoint it starts from, appends to metrics.jsonl (never truncated) and keeps the run id;
- one-line errors before loading: an output folder that cannot be created, a missing
  ``generate --model`` path, a Hub name with no network (seconds, not retries);
- output to a file (not a terminal) has no progress-bar redraws; the per-step line shows reward,
  accuracy, entropy and clip fractions, not the surrogate loss; ``--algo`` help lists every
  registered algorithm; the plot is titled with the run.
"""
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time

import pytest
import torch

from entropy_ops.trainers import grpo_trainer
from entropy_ops.trainers.algorithms import ALGORITHMS
from entropy_ops.trainers.checkpoint import INFO_FILE, STATE_FILE, list_checkpoints, save_checkpoint
from entropy_ops.trainers.cli import build_parser, main, resume_command
from entropy_ops.trainers.grpo_trainer import Trainer
from entropy_ops.trainers.logging_utils import EVAL_KEYS, format_eval, format_line, read_metrics

SMALL = ["--num_prompts=2", "--group_size=2", "--max_new_tokens=4", "--num_eval_prompts=4", "--eval_samples=1",
         "--eval_every=0", "--device=cpu", "--log_every=1", "--save_every=1", "--keep_checkpoints=1"]


@pytest.fixture(autouse=True)
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def snapshot(root) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def old_run(folder, *, run_id="old-run"):
    """A run as an earlier version left it: 42 metric lines, summary, plot, checkpoints at steps 100 and 200."""
    folder.mkdir(parents=True)
    rows = [{"step": s, "kind": "train", "reward/mean": 0.5} for s in range(1, 43)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text('{"steps": 200}')
    (folder / "metrics.png").write_bytes(b"\x89PNG old plot")
    (folder / "config.yaml").write_text("algo: grpo\n")
    (folder / "notes.txt").write_text("the user's own notes\n")
    for step, rid in ((100, None), (200, run_id)):  # one from before run ids, one with an id
        ckpt = folder / f"checkpoint-{step:06d}"
        ckpt.mkdir()
        (ckpt / STATE_FILE).write_bytes(b"state")
        if rid is not None:
            (ckpt / INFO_FILE).write_text(json.dumps({"step": step, "run_id": rid}))
    return snapshot(folder)


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_new_run_into_a_folder_holding_a_run_is_refused(tmp_path, capsys, no_model_loading):
    run = tmp_path / "run"
    before = old_run(run)
    err = one_line_error(capsys, ["train", "--output-dir", str(run), "--max-steps", "3", *SMALL])
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err and "--output-dir" in err
    assert snapshot(run) == before  # nothing truncated, overwritten or pruned
    # --resume needs a checkpoint it can start from; --resume with --overwrite is a contradiction
    (run / "checkpoint-000100" / STATE_FILE).unlink()
    (run / "checkpoint-000200" / STATE_FILE).unlink()
    before = snapshot(run)
    err = one_line_error(capsys, ["train", "--output-dir", str(run), "--resume", *SMALL])
    assert "no checkpoint to resume from" in err and "--overwrite" in err
    err = one_line_error(capsys, ["train", "--output-dir", str(run), "--resume", "--overwrite"])
    assert "resume and overwrite exclude each other" in err
    assert snapshot(run) == before


def test_overwrite_moves_the_old_run_aside_and_keeps_the_new_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    before = old_run(run)
    assert main(["train", "--output-dir", str(run), "--max-steps", "1", "--overwrite", *SMALL, "--plot=false"]) == 0
    (moved,) = [p for p in run.iterdir() if p.name.startswith("previous-")]
    user_files = {"notes.txt"}
    assert snapshot(moved) == {k: v for k, v in before.items() if k not in user_files}  # all 42 lines etc.
    assert (run / "notes.txt").read_text() == "the user's own notes\n"  # not a run file: left in place
    assert [s for s, _ in list_checkpoints(str(run))] == [1]  # the new run's checkpoint survived pruning
    rows = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1]
    assert "moved to" in capsys.readouterr().err


class FakeModel:
    def save_pretrained(self, path):
        open(os.path.join(path, "model.safetensors"), "wb").close()


def test_pruning_touches_only_the_current_runs_checkpoints(tmp_path):
    run = tmp_path / "run"
    before = old_run(run)  # another run's checkpoints at steps 100 (no id) and 200 (id "old-run")
    for step in (1, 2, 3):
        save_checkpoint(str(run), step, model=FakeModel(), tokenizer=FakeModel(), state={}, keep=1, run_id="new")
    assert [s for s, _ in list_checkpoints(str(run))] == [3, 100, 200]
    assert {k: v for k, v in snapshot(run).items() if "checkpoint-000003" not in k} == before
    # A checkpoint of another run at the same step is moved aside, never deleted.
    save_checkpoint(str(run), 200, model=FakeModel(), tokenizer=FakeModel(), state={}, keep=5, run_id="new")
    (aside,) = [p for p in run.iterdir() if p.name.startswith("checkpoint-000200.replaced-")]
    assert json.loads((aside / INFO_FILE).read_text())["run_id"] == "old-run"
    assert json.loads((run / "checkpoint-000200" / INFO_FILE).read_text())["run_id"] == "new"


def test_ctrl_c_evaluates_prints_resume_command_and_resume_appends(tmp_path, capsys, monkeypatch,
                                                                  ctrl_c_after_each_step):
    run = str(tmp_path / "run")
    argv = ["train", "--output-dir", run, "--max-steps", "2", *SMALL]
    restore = ctrl_c_after_each_step()
    assert main(argv) == 130
    restore()
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err  # not a terminal: no progress-bar redraws
    assert "held-out after (step 1): greedy_acc=" in out.out  # evaluated at the stop, not step 0 again
    (command,) = [line.split("continue with: ", 1)[1] for line in out.out.splitlines() if "continue with: " in line]
    resume_argv = shlex.split(command)
    assert resume_argv[0] == "entropy-ops" and resume_argv[-3:] == ["--output-dir", run, "--resume"]
    log = os.path.join(run, "metrics.jsonl")
    lines_before = open(log).read()
    run_id = json.load(open(os.path.join(run, "run.json")))["run_id"]
    # an extra line logged after the checkpoint (as a crash between log and save would leave)
    with open(log, "a") as f:
        f.write(json.dumps({"step": 2, "kind": "train", "reward/mean": -1.0}) + "\n")

    titles = []

    def plot_and_record(jsonl, png, title=None):
        titles.append(title)
        return original_plot(jsonl, png, title=title)

    original_plot = grpo_trainer.plot_metrics
    monkeypatch.setattr(grpo_trainer, "plot_metrics", plot_and_record)
    assert main(resume_argv[1:]) == 0
    assert titles == [f"{run}: grpo, seed 0, 2 steps"] and os.path.getsize(os.path.join(run, "metrics.png")) > 1000
    out = capsys.readouterr().out
    assert f"resuming from {os.path.join(run, 'checkpoint-000001')} (step 1)" in out
    text = open(log).read()
    assert text.startswith(lines_before)  # appended, never truncated
    rows = read_metrics(log)
    assert [(r["step"], r["kind"]) for r in rows] == [(0, "eval"), (1, "train"), (1, "eval"), (1, "resume"),
                                                      (2, "train"), (2, "eval")]  # the stray step-2 row superseded
    assert len(read_metrics(log, raw=True)) == len(rows) + 1
    (ckpt,) = [p for _, p in list_checkpoints(run)]
    assert json.load(open(os.path.join(ckpt, INFO_FILE))) == {"step": 2, "run_id": run_id}
    assert "held-out after (step 2): greedy_acc=" in out and "continue with" not in out


def test_resume_continues_with_the_runs_saved_settings(tmp_path, capsys, monkeypatch):
    """The reported case: a plain ``--resume`` ran as grpo, seed 0, lr 1e-4, 1000 eval problems."""
    import yaml

    run = str(tmp_path / "run")
    first = ["train", "--algo", "seed-grpo", "--seed", "1", "--output-dir", run, "--max-steps", "1",
             "--learning_rate=5e-5", "--dataset=arithmetic", "--overwrite", *SMALL, "--plot=false"]
    assert main(first) == 0
    saved = open(os.path.join(run, "config.yaml")).read()
    capsys.readouterr()

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the resumed settings were checked")

    with monkeypatch.context() as m:  # a change of what defines the experiment: one line, nothing loaded
        m.setattr(grpo_trainer, "load_model", forbidden)
        for flag, value, key in (("--seed", "0", "seed"), ("--algo", "grpo", "algo"),
                                 ("--num_eval_prompts=20", None, "num_eval_prompts")):
            extra = [flag] if value is None else [flag, value]
            err = one_line_error(capsys, ["train", "--output-dir", run, "--resume", *extra])
            assert f"--resume cannot change {key}" in err and "--output-dir" in err, err
    assert open(os.path.join(run, "config.yaml")).read() == saved

    # extending the run (and, with a warning, another learning rate): everything else as saved
    assert main(["train", "--output-dir", run, "--resume", "--max-steps", "2", "--learning_rate=1e-4"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"training seed-grpo on tiny-arith, task arithmetic, 2 steps (seed 1, lr 0.0001) -> {run}"
    assert "held-out after (step 2): greedy_acc=" in out  # the labels of the held-out lines
    assert "resume: max_steps 1 -> 2\n" in err and "resume: learning_rate 5e-05 -> 0.0001 (this changes" in err
    config = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert (config["algo"], config["seed"], config["dataset"], config["num_eval_prompts"]) == (
        "seed-grpo", 1, "arithmetic", 4)
    assert (config["max_steps"], config["learning_rate"], config["resume"]) == (2, 1e-4, False)
    (resumed,) = json.load(open(os.path.join(run, "run.json")))["resumes"]
    assert resumed["step"] == 1 and resumed["checkpoint"] == "checkpoint-000001"
    assert resumed["changed"] == {"learning_rate": [5e-5, 1e-4], "max_steps": [1, 2]}  # the original kept
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert [(r["step"], r["kind"]) for r in rows] == [(0, "eval"), (1, "train"), (1, "eval"), (1, "resume"),
                                                      (2, "train"), (2, "eval")]
    assert rows[3]["changed"] == resumed["changed"]
    assert [s for s, _ in list_checkpoints(run)] == [2]


def test_second_ctrl_c_skips_the_evaluation_at_the_stop_and_says_so(tmp_path, capsys, monkeypatch,
                                                                    ctrl_c_after_each_step):
    run = str(tmp_path / "run")
    original_evaluate = Trainer.evaluate

    def evaluate_or_second_ctrl_c(self):
        if self.step > 0:  # the evaluation at the stop: the user presses Ctrl-C again
            raise KeyboardInterrupt
        return original_evaluate(self)

    ctrl_c_after_each_step()
    monkeypatch.setattr(Trainer, "evaluate", evaluate_or_second_ctrl_c)
    assert main(["train", "--output-dir", run, "--max-steps", "3", *SMALL, "--plot=false"]) == 130
    out = capsys.readouterr().out
    assert "held-out after: not evaluated at step 1 (the last evaluation ran at step 0)" in out
    assert "held-out evaluation at the stop skipped" in out and "continue with: " in out
    assert [s for s, _ in list_checkpoints(run)] == [1]  # the checkpoint was saved before the evaluation


def test_resume_command_replaces_output_and_run_flags():
    got = resume_command(["train", "--algo", "rloo", "--output_dir=x", "--overwrite", "--seed", "3"], "runs/a b")
    assert shlex.split(got) == ["entropy-ops", "train", "--algo", "rloo", "--seed", "3", "--output-dir", "runs/a b",
                                "--resume"]
    assert shlex.split(resume_command(["train", "--output-dir", "d", "--resume"], "d"))[1:] == [
        "train", "--output-dir", "d", "--resume"]


@pytest.mark.parametrize("make_bad, argv_of, message", [
    (lambda t: (t / "file").write_text("x"), lambda t: ["train", "--output-dir", str(t / "file" / "run")],
     "cannot be created"),
    (lambda t: (t / "file").write_text("x"), lambda t: ["train", "--output-dir", str(t / "file")],
     "is not a directory"),
    (lambda t: None, lambda t: ["generate", "--model", str(t / "no-model")], "--model: model path"),
    (lambda t: None, lambda t: ["generate", "--prompts-file", str(t / "none.txt")], "--prompts-file"),
    (lambda t: None, lambda t: ["generate", "--output", str(t / "no-dir" / "out.jsonl")], "--output"),
])
def test_errors_are_one_line_naming_the_argument(tmp_path, capsys, no_model_loading, make_bad, argv_of, message):
    make_bad(tmp_path)
    assert message in one_line_error(capsys, argv_of(tmp_path))


@pytest.mark.parametrize("command", ["train", "generate"])
def test_hub_name_without_network_fails_fast(tmp_path, command):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "0"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "entropy_ops.trainers", command, "--model", "some-org/some-model",
                           "--output-dir" if command == "train" else "--seed", str(tmp_path / "run") if
                           command == "train" else "0"], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and "model: 'some-org/some-model'" in err and "cannot be reached" in err
    assert elapsed < 60  # an import and one refused connection (download retries took 23-41 s)
    assert not (tmp_path / "run").exists()


def test_offline_hub_name_not_cached_is_one_line(tmp_path, capsys, monkeypatch, no_model_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    err = one_line_error(capsys, ["generate", "--model", "some-org/some-model"])
    assert "HF_HUB_OFFLINE" in err


def test_console_line_shows_what_a_user_can_read():
    metrics = {"reward/mean": 0.5, "correct_frac": 0.25, "entropy": 0.31, "loss/loss": 1e-9,
               "loss/clip_frac_low": 0.0, "loss/clip_frac_high": 0.125, "grad_norm": 2.0}
    line = format_line(3, metrics)
    for part in ("reward=0.5", "acc=0.25", "entropy=0.31", "clip_low=0", "clip_high=0.125"):
        assert part in line
    assert "1e-09" not in line and "loss=" not in line
    # held-out figures use the same labels at every step and at the end, per slice too
    ev = {"step": 40, "kind": "eval", "eval/greedy_correct": 0.5, "eval/sampled_correct": 0.25,
          "eval/greedy_correct/carry78": 0.75, "eval/greedy_planted/carry78": 0.125, "eval/entropy": 0.2}
    assert format_eval(ev) == "greedy_acc=0.5  sampled_acc=0.25  greedy_acc/carry78=0.75"
    assert format_line(40, ev, EVAL_KEYS) == "step 40  greedy_acc=0.5  sampled_acc=0.25  entropy=0.2"


def test_algo_help_lists_every_registered_algorithm():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    text = train.format_help().replace("\n", " ")
    text = " ".join(text.split())
    for name in ALGORITHMS:
        assert name in text, name
