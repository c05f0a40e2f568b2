"""benchmarks/gpu_check.py's bad input: one line naming the flag and the reason, exit 2, before anything runs
or is written (the timings themselves run on a GPU: `make gpu-check`)."""
import os
import subprocess
import sys

import pytest
import torch

from engine import UserError
from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "--device 'tpu' is not a device; use cuda, cuda:N or cpu"),
    (["--device", "meta"], "--device 'meta': gpu_check runs on cuda (or cpu for a dry run)"),
    (["--train-steps", "0"], "--train-steps must be >= 1, got 0"),
    (["--reps", "x"], "argument --reps: invalid int value: 'x'"),
    (["--out", "results.txt"], "--out 'results.txt' must name a .csv file"),
])
def test_bad_input_is_one_line_naming_it(argv, message, tmp_path):
    with pytest.raises(UserError) as err:
        gpu_check.parse_args([*argv, *(["--device", "cpu"] if "--device" not in argv else [])])
    assert str(err.value) == message


def test_an_out_folder_that_cannot_hold_the_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is not a writable folder"):
        gpu_check.parse_args(["--device", "cpu", "--out", str(tmp_path / "file" / "sub" / "gpu_check.csv")])
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_an_out_file_of_other_columns_is_refused_untouched(tmp_path):
    out = tmp_path / "other.csv"
    out.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="holds other columns than gpu_check's"):
        gpu_check.parse_args(["--device", "cpu", "--out", str(out)])
    assert out.read_text() == "a,b\n1,2\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_the_script_exits_2_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_check.csv"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines()[-1] == ("error: --device cuda: CUDA is not available on this machine "
                                                   "(--device cpu runs the same steps as a dry run)")
