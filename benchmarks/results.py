"""Results files of the benchmarks: `benchmarks/results/<name>.csv`, one row per measured case.

    from results import write_rows
    write_rows("bench_loss", [{"logits": "4096x1000", "candidate": "root", "ratio": 0.47}, ...])

Every row gets the columns `machine` (CPU model, cores and vector instructions; GPU model), `threads`
(torch's CPU threads), `date` (UTC, ISO 8601) and `commit` (the repository's HEAD, `+dirty` with
uncommitted changes) after its own columns. The file is replaced atomically (written beside it, then renamed), so a killed benchmark
never leaves half a file. The documentation's benchmarks page renders every such file as a table
(`docs/gen_results.py`)."""
import csv
import datetime
import os
import platform
import subprocess
import tempfile

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONTEXT = ("machine", "threads", "date", "commit")


def machine():
    """The CPU's model name, cores and the vector instructions torch uses on it (AVX2, AVX512, ...: CPUs of one
    name differ in them), and the GPU's name when torch sees one."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = f"{name}, {os.cpu_count()} cores"
    try:
        import torch
        name += ", " + torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            name += ", " + torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return name


def threads():
    try:
        import torch
        return torch.get_num_threads()
    except ImportError:
        return 1


def commit():
    """HEAD, with `+dirty` where tracked files differ from it; the results files do not count (a benchmark that
    writes its file case by case would otherwise mark its own later rows dirty)."""
    root = os.path.dirname(RESULTS_DIR)
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                f":!{os.path.relpath(RESULTS_DIR, root)}"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_rows(name, rows, directory=RESULTS_DIR, keep=None):
    """Write `rows` (dicts; the union of their keys, in first-seen order, are the columns) to
    `directory/name.csv` with the machine / threads / date / commit columns; returns the path. `keep`
    (column names): the file's rows whose values in those columns match none of `rows`, and every row
    measured on another machine, stay, first, with their own machine, date and commit, so that a run of a
    subset of cases updates only its own rows and one machine's run never erases another's."""
    rows = [dict(r) for r in rows]
    path = os.path.join(directory, f"{name}.csv")
    if keep and os.path.isfile(path):
        here, new = machine(), {tuple(str(r.get(k, "")) for k in keep) for r in rows}
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f)
                    if r.get("machine") != here or tuple(r.get(k, "") for k in keep) not in new] + rows
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns and k not in CONTEXT]
    context = {"machine": machine(), "threads": threads(),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "commit": commit()}
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns + list(CONTEXT), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({**context, **row})
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
