"""The launched scripts (train/, tools/) import the package only under ``__main__``.

A child process started with multiprocessing's "spawn" method re-runs the launched script as
``__mp_main__`` before it does its work. megatron's checkpoint writer starts such a child at the
first save; with the trainer imported at the top of the script, that child imported torch and
megatron again and the first save took 4.3 s instead of 1.9 s (docs/BENCHMARKS.md).
"""
import subprocess
import sys

import pytest

from trainer_runs import REPO

SCRIPTS = [REPO / "train" / "pretrain_llava_ov.py", *sorted((REPO / "tools").glob("*.py"))]
AS_A_SPAWNED_CHILD = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='__mp_main__'); "
                      "print(sorted(name for name in ('torch', 'megatron', 'megatron_patch') "
                      "if name in sys.modules))")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_a_spawned_child_does_not_import_the_package_again(script):
    result = subprocess.run([sys.executable, "-c", AS_A_SPAWNED_CHILD, str(script)], cwd=REPO,
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
