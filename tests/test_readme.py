"""The README runs as written: every ```python block executes on a CPU, every `entropy-ops` line parses,
and its commands match CI.

A block that is not meant to run here (a CUDA-only example, say) is marked on the line just before its
fence with ``<!-- not run by tests/test_readme.py: REASON -->``; marks are few and carry a reason.
Also: the test command is the line ``.ci/run`` runs, every local link points to a file that exists,
and nothing cites a document outside the repository.
"""
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
SKIP = re.compile(r"<!-- not run by tests/test_readme\.py: (.+?) -->\s*$")
MAX_SKIPPED = 2


def code_blocks(text: str, language: str) -> list[tuple[int, str, str | None]]:
    """``(line number, code, skip reason or None)`` of each fenced block in ``language``."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}":
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            mark = SKIP.search(lines[start - 2]) if start >= 2 else None
            blocks.append((start, "\n".join(body) + "\n", mark.group(1) if mark else None))
        i += 1
    return blocks


PYTHON = code_blocks(README, "python")


def test_readme_has_python_examples_and_few_skips():
    assert len(PYTHON) >= 2
    assert sum(reason is not None for _, _, reason in PYTHON) <= MAX_SKIPPED


@pytest.mark.parametrize("line, code, reason", PYTHON, ids=[f"README.md:{line}" for line, _, _ in PYTHON])
def test_python_block_runs(line, code, reason):
    if reason is not None:
        pytest.skip(reason)
    threads = torch.get_num_threads()
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    finally:
        torch.set_num_threads(threads)


def test_ci_runs_the_readme_test_command_verbatim():
    bash = [code for _, code, _ in code_blocks(README, "bash")]
    test_command = next(code.strip() for code in bash if "pytest" in code)
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert test_command in ci
    assert bash[0].strip().endswith("entropy-ops train")  # the main job comes first, the tests second
    assert "pytest" in bash[1]


def test_local_links_exist_and_no_outside_reference():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith(("http://", "https://")):
            assert os.path.exists(os.path.join(ROOT, target)), f"README links to missing {target}"
    assert "ALGORITHMS.md" not in README and "reference sheet" not in README


def test_no_file_cites_the_math_outside_the_repository():
    """The math is docs/math.md; no docstring or document points to a sheet that is not shipped."""
    offenders = []
    for folder in ("kernels", "entropy_ops", "trainers", "tests", "docs", "examples", "benchmarks"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in names:
                path = os.path.join(dirpath, name)
                if name.endswith((".py", ".md")) and os.path.abspath(path) != os.path.abspath(__file__):
                    if "ALGORITHMS.md" in open(path, encoding="utf-8").read():
                        offenders.append(os.path.relpath(path, ROOT))
    assert not offenders, f"cite docs/math.md instead of ALGORITHMS.md in {offenders}"


def test_cli_examples_parse(capsys):
    """Every ``entropy-ops`` line of the README's shell blocks names real commands, flags and config keys."""
    import shlex

    from entropy_ops.trainers import compare, generate
    from entropy_ops.trainers.cli import main

    lines = [line.split("#")[0].strip() for _, code, _ in code_blocks(README, "bash") for line in code.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("entropy-ops ")]
    assert {c[0] for c in commands} >= {"train", "compare", "generate"}
    for argv in commands:
        if argv[0] == "train":  # resolves and validates the whole config, loads nothing
            assert main([*argv, "--print-config"]) == 0, argv
        elif argv[0] == "compare":
            args, overrides = compare.build_parser().parse_known_args(argv[1:])
            assert all(o.startswith("--") and "=" in o for o in overrides), argv
        else:
            generate.build_parser().parse_args(argv[1:])
    capsys.readouterr()
