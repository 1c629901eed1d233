"""The README's commands and code stay true."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TEST_COMMAND = '    python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest'
TRAIN_COMMAND = "    python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/fmjax train"


def test_readme_opens_with_the_two_commands():
    head = README.splitlines()[:10]
    assert TRAIN_COMMAND in head and TEST_COMMAND in head


def test_ci_runs_the_readme_test_command_verbatim():
    assert TEST_COMMAND.strip() in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["state"].step == 201  # 200 in the training loop, 1 on the mesh
    assert namespace["fixed"].trajectory.xs.shape == (101, 256, 2)
    assert int(namespace["result"].nfe) > 0
    lik, est = namespace["lik"], namespace["est"]  # exact and Hutchinson log-likelihoods of 256 points
    standard_error = float((est.log_p_stderr**2).sum() ** 0.5 / 256)
    assert abs(float(lik.log_p.mean() - est.log_p.mean())) < 4 * standard_error
