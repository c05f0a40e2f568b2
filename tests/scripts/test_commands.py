"""commands.txt cannot rot: every line that runs one of our scripts is accepted by that script's parser.

Format of commands.txt (what this test reads):
- Blank lines and lines starting with `#` are comments; as in bash, ` #` ends a line's arguments. A
  trailing backslash continues a line. Words are split as by bash (shlex: quotes work).
- A line may chain commands with `&&` or `;` (surrounded by spaces); each runs from the repository root.
- A line starting with `cd <dir> &&` runs in another checkout (NVIDIA's stylegan2-ada-pytorch for the
  StyleGAN2-ADA runs, after `cp stylegan_patch/loss.py <dir>/training/loss.py`): it is skipped, since the
  scripts it runs are not ours.
- A command that runs a Python script (`python X.py ...`, `torchrun ... X.py ...`, optionally after
  `VAR=value` assignments) names a script of this repository. For train.py, regression.py, ft_opt.py,
  opt.py and gan.py, the arguments after the script must be accepted by its parser: the script's
  `build_parser().parse_args(args)`, or its `parse_args(args)` where it has no `build_parser`. The check
  imports the script by file name and parses; nothing is trained. llm_pipeline.py is checked the same way.
  Any other script must exist.
- Output redirections (`> log`, `2>&1`, `| tee log`) are ignored.
- Other commands (git clone, cp, sed, mkdir, ...) are not checked.
"""
import contextlib
import functools
import importlib.util
import io
import os
import re
import shlex

import pytest
from tests.helpers import ROOT

COMMANDS = os.path.join(ROOT, "commands.txt")
CHECKED = ("train.py", "regression.py", "ft_opt.py", "opt.py", "gan.py", "llm_pipeline.py")
LAUNCHERS = ("python", "python3", "torchrun")
REDIRECT = re.compile(r"^(\||\d*>|\d*<|&>)")  # |, >, >>, 2>&1, 2>file, <, &>


def logical_lines(text):
    """(line number, text) of each non-comment line, continuations joined."""
    out, pending, start = [], "", None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        start = start or number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, pending + line))
        pending, start = "", None
    if pending:
        raise ValueError(f"line {start}: continuation backslash at the end of the file")
    return out


def split_commands(line):
    """Commands chained with && or ; (quoted operators stay inside their argument)."""
    commands, current = [], []
    for token in shlex.split(line, comments=True):
        if token in ("&&", ";"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def script_call(tokens):
    """(script path, its arguments) for a python/torchrun command, else None."""
    while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens or os.path.basename(tokens[0]) not in LAUNCHERS:
        return None
    for i, token in enumerate(tokens[1:], 1):
        if token.endswith(".py"):
            args = tokens[i + 1:]
            for j, arg in enumerate(args):
                if REDIRECT.match(arg):
                    args = args[:j]
                    break
            return token, args
    return None


def parse_commands(text):
    """([(line number, script, args)] to check, [(line number, text)] skipped as another checkout's)."""
    checks, external = [], []
    for number, line in logical_lines(text):
        commands = split_commands(line)
        if commands and commands[0][0] == "cd":
            external.append((number, line))
            continue
        for tokens in commands:
            call = script_call(tokens)
            if call is not None:
                checks.append((number, call[0], call[1]))
    return checks, external


@functools.lru_cache(maxsize=None)
def load_parse(path):
    """The script's argument parsing function: build_parser().parse_args, or its parse_args."""
    name = "_commands_check_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "build_parser"):
        return lambda args: module.build_parser().parse_args(args)
    if hasattr(module, "parse_args"):
        return module.parse_args
    raise AssertionError(f"{path} has neither build_parser() nor parse_args(argv)")


def check(root, number, script, args):
    """Raise AssertionError naming the line if the script is missing or rejects the arguments."""
    path = os.path.join(root, script)
    if not os.path.isfile(path):
        raise AssertionError(f"commands.txt line {number}: {script} does not exist")
    if os.path.basename(script) not in CHECKED:
        return
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            load_parse(path)(list(args))
    except SystemExit as exit:
        if exit.code not in (0, None):  # --help exits 0
            raise AssertionError(f"commands.txt line {number}: {script} rejects {shlex.join(args)}:\n"
                                 f"{stderr.getvalue().strip()}") from None
    except ValueError as err:  # engine.UserError raised by a script's own validation in parse_args
        raise AssertionError(f"commands.txt line {number}: {script}: {err}") from None


# ---- the format itself, on a temporary file ---------------------------------------------------------

SAMPLE = r"""# CIFAR-10
python train.py --dataset cifar10 \
    --net resnet18 --loss root --k 8   # a comment after the arguments

CUDA_VISIBLE_DEVICES=0 python opt.py facebook/opt-125m wikitext2 --wbits 2 > log.txt 2>&1
torchrun --nproc_per_node=4 train.py --dataset cifar100 | tee out.log
mkdir -p runs && python gan.py --loss root --k 2 ; python3 regression.py --dataset "a; b" 2>err.txt
cd stylegan2-ada-pytorch && python train.py --outdir=runs --data=ffhq.zip --gpus=1
git clone https://github.com/NVlabs/stylegan2-ada-pytorch.git
"""


def test_format_parsing():
    checks, external = parse_commands(SAMPLE)
    assert checks == [
        (2, "train.py", ["--dataset", "cifar10", "--net", "resnet18", "--loss", "root", "--k", "8"]),
        (5, "opt.py", ["facebook/opt-125m", "wikitext2", "--wbits", "2"]),
        (6, "train.py", ["--dataset", "cifar100"]),
        (7, "gan.py", ["--loss", "root", "--k", "2"]),
        (7, "regression.py", ["--dataset", "a; b"]),
    ]
    assert [n for n, _ in external] == [8]
    with pytest.raises(ValueError, match="line 1: continuation"):
        logical_lines("python gan.py \\\n")


def test_check_accepts_and_rejects(tmp_path):
    (tmp_path / "gan.py").write_text(
        "import argparse\n"
        "def build_parser():\n"
        "    p = argparse.ArgumentParser()\n"
        "    p.add_argument('--k', type=float, required=True)\n"
        "    return p\n")
    (tmp_path / "opt.py").write_text(
        "import argparse\n"
        "def parse_args(argv):\n"
        "    p = argparse.ArgumentParser()\n"
        "    p.add_argument('model')\n"
        "    args = p.parse_args(argv)\n"
        "    if args.model == 'bad':\n"
        "        raise ValueError('unknown model bad')\n"
        "    return args\n")
    (tmp_path / "helper.py").write_text("")
    checks, _ = parse_commands("python gan.py --k 2\npython opt.py m\npython helper.py --anything\n"
                               "python gan.py --k two\npython gan.py --q 1\npython opt.py bad\n"
                               "python missing.py\n")
    for number, script, args in checks[:3]:
        check(str(tmp_path), number, script, args)
    for (number, script, args), message in zip(checks[3:], ["invalid float value: 'two'", "--k",
                                                            "unknown model bad", "missing.py does not exist"]):
        with pytest.raises(AssertionError, match=f"line {number}:") as err:
            check(str(tmp_path), number, script, args)
        assert message in str(err.value)


# ---- the repository's commands.txt --------------------------------------------------------------------

def _real():
    if not os.path.exists(COMMANDS):
        return [], []
    with open(COMMANDS) as f:
        return parse_commands(f.read())


REAL_CHECKS, REAL_EXTERNAL = _real()


def test_commands_txt_covers_every_experiment():
    if not os.path.exists(COMMANDS):
        pytest.skip("commands.txt is not in the repository root yet")
    scripts = {os.path.basename(s) for _, s, _ in REAL_CHECKS}
    assert set(CHECKED) <= scripts, f"no line runs {sorted(set(CHECKED) - scripts)}"
    stylegan = [line for _, line in REAL_EXTERNAL if "stylegan2-ada-pytorch" in line and "train.py" in line]
    assert stylegan, "no StyleGAN2-ADA training line (cd stylegan2-ada-pytorch && python train.py ...)"


@pytest.mark.parametrize("number,script,args", REAL_CHECKS or [pytest.param(
    0, "", [], marks=pytest.mark.skip(reason="commands.txt is not in the repository root yet"))],
    ids=[f"line{n}-{s}" for n, s, _ in REAL_CHECKS] or ["missing"])
def test_commands_txt_line_is_accepted(number, script, args):
    check(ROOT, number, script, args)
