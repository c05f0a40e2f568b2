"""The documentation cannot rot: every command it shows still runs, and the README stays short.

What is checked, in README.md and docs/*.md:
- Each command of a shell code block (``` or ```bash/sh/console; not python/json/bibtex blocks) that runs
  Python (`python X.py ...`, `python -m pkg.mod ...`, `torchrun ... X.py ...`), read as commands.txt is
  (tests/scripts/test_commands.py: continuation lines, `&&`, redirections, `VAR=value` prefixes): the script
  or module must exist, and every `--flag` it passes must appear in the output of `--help`. For the
  experiment scripts commands.txt checks (train.py, opt.py, ...) the whole argument list must also be
  accepted by the script's parser, in-process as test_commands does.
- Each inline code span that starts with `python ` (prose may use placeholders such as `--lr LR`): the
  script or module must exist and its flags must appear in `--help`.
- Each `make TARGET` in a code block names a Makefile target.
Every script's `--help` runs once, in this process (as `python X.py --help` would run it, as __main__),
so the test stays fast.

- README.md is at most 200 lines, and neither it nor the docs, commands.txt or the code say which
  ticket or work session a change came from (the grep below finds nothing).
"""
import contextlib
import functools
import glob
import io
import os
import re
import runpy
import shlex
import subprocess
import sys

from test_commands import CHECKED, LAUNCHERS, REDIRECT, check, load_parse, logical_lines, split_commands
from tests.helpers import ROOT

PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
FENCE = re.compile(r"^```(\w*)\s*$")
INLINE = re.compile(r"`(python3? [^`]+)`")
FLAG = re.compile(r"^--[A-Za-z][\w-]*")


def shell_blocks(text):
    """(first line number, block text) of every shell code block."""
    blocks, lang, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line.strip())
        if lang is None and m:
            lang, start, lines = m.group(1).lower(), number + 1, []
        elif lang is not None and line.strip() == "```":
            if lang in SHELL_BLOCKS:
                blocks.append((start, "\n".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def target(tokens):
    """(kind, name, args) of a command: ('script', path, args), ('module', dotted name, args),
    ('make', target, []) or None for anything else."""
    while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "make":
        return ("make", tokens[1] if len(tokens) > 1 else "", [])
    if os.path.basename(tokens[0]) not in LAUNCHERS:
        return None
    for i, token in enumerate(tokens[1:], 1):
        if token == "-m" and tokens[0] != "torchrun":
            kind, name, args = "module", tokens[i + 1], tokens[i + 2:]
            break
        if token.endswith(".py"):
            kind, name, args = "script", token, tokens[i + 1:]
            break
    else:
        return None
    for j, arg in enumerate(args):
        if REDIRECT.match(arg):
            args = args[:j]
            break
    return kind, name, args


def doc_commands(pages=PAGES, root=ROOT):
    """[(where, kind, name, args, full)]: full is True for code blocks (parsed by the script's own parser
    where commands.txt's test does so), False for inline spans (existence and flags only)."""
    found = []
    for page in pages:
        with open(os.path.join(root, page)) as f:
            text = f.read()
        for start, block in shell_blocks(text):
            for offset, line in logical_lines(block):
                for tokens in split_commands(line):
                    t = target(tokens)
                    if t is not None:
                        found.append((f"{page}:{start + offset - 1}", *t, True))
        for number, line in enumerate(text.splitlines(), 1):
            for span in INLINE.findall(line):
                try:
                    tokens = shlex.split(span)
                except ValueError:
                    continue
                t = target(tokens)
                if t is not None and t[0] != "make":
                    found.append((f"{page}:{number}", *t, False))
    return found


def module_path(name, root=ROOT):
    base = os.path.join(root, *name.split("."))
    for path in (base + ".py", os.path.join(base, "__main__.py")):
        if os.path.isfile(path):
            return path
    return None


def make_targets(root=ROOT):
    with open(os.path.join(root, "Makefile")) as f:
        return set(re.findall(r"^([A-Za-z][\w.-]*):", f.read(), flags=re.M))


@functools.lru_cache(maxsize=None)
def in_process_help(path):
    """--help of an experiment script through its own parser (no subprocess: the parser is loaded once)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            load_parse(path)(["--help"])
        except SystemExit:
            pass
    return out.getvalue()


def run_help(kind, name, root=ROOT):
    """(exit status, output) of `python [-m] NAME --help`, run in this process as __main__ (the heavy
    imports, torch and transformers, are shared instead of paid once per script)."""
    out, argv, path = io.StringIO(), sys.argv[:], sys.path[:]
    code = "no exit"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                if kind == "module":
                    sys.argv, sys.path[:0] = [name, "--help"], [root]
                    runpy.run_module(name, run_name="__main__", alter_sys=True)
                else:
                    script = os.path.join(root, name)
                    sys.argv, sys.path[:0] = [script, "--help"], [os.path.dirname(script), root]
                    runpy.run_path(script, run_name="__main__")
            except SystemExit as exit:
                code = 0 if exit.code is None else exit.code
            except Exception as err:  # an import that fails, a renamed module the script imports
                code = f"{type(err).__name__}: {err}"
    finally:
        sys.argv, sys.path[:] = argv, path
    return code, out.getvalue()


def flags(args):
    return sorted({FLAG.match(a).group(0) for a in args if FLAG.match(a)})


def check_commands(commands, root=ROOT):
    """Every problem found, one line each (an empty list: all commands run)."""
    problems, helps, wanted = [], {}, set()
    targets = make_targets(root)
    for where, kind, name, args, full in commands:
        if kind == "make":
            if name not in targets:
                problems.append(f"{where}: make {name}: no such Makefile target")
        elif kind == "module" and module_path(name, root) is None:
            problems.append(f"{where}: python -m {name}: no such module in the repository")
        elif kind == "script" and not os.path.isfile(os.path.join(root, name)):
            problems.append(f"{where}: {name} does not exist")
        elif kind == "script" and os.path.basename(name) in CHECKED:
            helps[(kind, name)] = (0, in_process_help(os.path.join(root, name)))
        else:
            wanted.add((kind, name))
    for key in sorted(wanted):
        helps[key] = run_help(*key, root=root)
    for where, kind, name, args, full in commands:
        if (kind, name) not in helps:
            continue
        code, text = helps[(kind, name)]
        shown = f"python -m {name}" if kind == "module" else name
        if code != 0:
            problems.append(f"{where}: {shown} --help exits {code}: {text.strip().splitlines()[-1:]}")
            continue
        missing = [flag for flag in flags(args) if not re.search(re.escape(flag) + r"(?![\w-])", text)]
        if missing:
            problems.append(f"{where}: {shown} has no {', '.join(missing)} (see its --help)")
        elif full and kind == "script" and os.path.basename(name) in CHECKED:
            try:
                check(root, where, name, args)
            except AssertionError as err:
                problems.append(f"{where}: {str(err).removeprefix(f'commands.txt line {where}: ')}")
    return problems


# ---- the checker itself, on temporary files -------------------------------------------------------------

def test_extraction_and_checks(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "Makefile").write_text("demo:\n\techo\ntest: demo\n\techo\n")
    (tmp_path / "tool.py").write_text(
        "import argparse\np = argparse.ArgumentParser()\np.add_argument('--size')\np.parse_args()\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mod.py").write_text(
        "import argparse\np = argparse.ArgumentParser()\np.add_argument('--out')\np.parse_args()\n")
    (tmp_path / "README.md").write_text(
        "Run `python tool.py --size N` or `python tool.py --colour red`.\n\n"
        "```bash\nmake demo   # comment\nmake nope\npython tool.py --size 3 \\\n    > log.txt\n"
        "CUDA_VISIBLE_DEVICES=0 python -m pkg.mod --out x && python missing.py\n```\n\n"
        "```python\npython_is_not_shell = 1\n```\n")
    (tmp_path / "docs" / "page.md").write_text("```\npython -m pkg.gone\npython -m pkg.mod --in y\n```\n")
    commands = doc_commands(["README.md", "docs/page.md"], str(tmp_path))
    assert [(w, k, n, a, f) for w, k, n, a, f in commands] == [
        ("README.md:4", "make", "demo", [], True),
        ("README.md:5", "make", "nope", [], True),
        ("README.md:6", "script", "tool.py", ["--size", "3"], True),
        ("README.md:8", "module", "pkg.mod", ["--out", "x"], True),
        ("README.md:8", "script", "missing.py", [], True),
        ("README.md:1", "script", "tool.py", ["--size", "N"], False),
        ("README.md:1", "script", "tool.py", ["--colour", "red"], False),
        ("docs/page.md:2", "module", "pkg.gone", [], True),
        ("docs/page.md:3", "module", "pkg.mod", ["--in", "y"], True),
    ]
    problems = check_commands(commands, str(tmp_path))
    assert problems == [
        "README.md:5: make nope: no such Makefile target",
        "README.md:8: missing.py does not exist",
        "docs/page.md:2: python -m pkg.gone: no such module in the repository",
        "README.md:1: tool.py has no --colour (see its --help)",
        "docs/page.md:3: python -m pkg.mod has no --in (see its --help)",
    ]


# ---- the repository's README.md and docs/ ----------------------------------------------------------------

def test_every_documented_command_runs():
    commands = doc_commands()
    scripts = {n for _, kind, n, _, _ in commands if kind == "script"}
    assert {"regression.py", "train.py", "ft_opt.py", "opt.py", "gan.py"} <= {os.path.basename(s) for s in scripts}
    problems = check_commands(commands)
    assert not problems, "documented commands that no longer run:\n" + "\n".join(problems)


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the manual belongs in docs/"


# the words are split so that this file does not match its own search
DEVELOPMENT_REMARKS = r"\|".join(["issue [0-9]", "cpu" + "job", "this" + " stop", "Issue [0-9]"])
SEARCHED = ["README.md", "docs", "commands.txt", "benchmarks", "quant", "lm", "tests", "reproduce", "engine",
            "losses", "models", "data"]


def test_no_development_remarks():
    paths = [p for p in SEARCHED if os.path.exists(os.path.join(ROOT, p))]
    paths += sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
    proc = subprocess.run(["grep", "-rn", "--exclude-dir=__pycache__",
                           DEVELOPMENT_REMARKS, *paths], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1, f"say why, not which ticket or session:\n{proc.stdout}{proc.stderr}"


def test_a_page_renders_one_results_file_in_place(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    try:
        import gen_results
        import hooks
    finally:
        sys.path.pop(0)
    (tmp_path / "bench_x.csv").write_text("model,tok/s,machine,threads,date,commit\n"
                                          "fp32,24.7,CPU,1,2026-01-01T00:00:00Z,abc\n")
    text = gen_results.render_one("bench_x", str(tmp_path))
    assert text.splitlines()[0] == "- CPU, 1 thread(s), 2026-01-01T00:00:00Z, commit `abc`"
    assert "| model | tok/s |" in text and "| fp32 | 24.7 |" in text and "###" not in text
    assert gen_results.render_one("bench_y", str(tmp_path)).startswith("No `bench_y` results yet")
    (tmp_path / "bench_z.csv").write_text("model,tok/s,machine,threads,date,commit\n"
                                          "fp32,24.7,CPU A,1,2026-01-01T00:00:00Z,abc\n"
                                          "fp32,30.1,CPU B,1,2026-01-02T00:00:00Z,def\n")
    rows = gen_results.render_one("bench_z", str(tmp_path)).splitlines()
    assert "| model | tok/s | machine | threads |" in rows and "| fp32 | 30.1 | CPU B | 1 |" in rows
    page = hooks.on_page_markdown("before\n\n<!-- results: bench_generate -->\n\nafter", None, None, None)
    assert "<!-- results" not in page and "| model |" in page and page.endswith("after")
