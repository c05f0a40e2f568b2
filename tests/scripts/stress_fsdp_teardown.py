"""Stress the end of 2-rank FSDP runs: ft_opt.py --fsdp under torchrun (gloo, CPU), run again and again,
alternating the two cases of tests/scripts/test_ft_opt.py (a fresh run, and a run resumed from a checkpoint of
epoch 1). A run fails when torchrun exits non-zero, a rank aborts ("terminate called" in its output) or
rank 0 did not write its results. Not a pytest test (the file name is not collected): run it by hand,
niced so that it shares the machine, from the repository root:

    nice -n 19 .venv/bin/python tests/scripts/stress_fsdp_teardown.py              # 200 runs, one busy process beside
    nice -n 19 .venv/bin/python tests/scripts/stress_fsdp_teardown.py --runs 40 --no-load
    nice -n 19 .venv/bin/python tests/scripts/stress_fsdp_teardown.py --jobs 2       # 2 runs at a time: more load, done sooner

The busy process (a Python spin loop, started and stopped here) makes the timing of the ranks' exit
vary, which is what an intermittent teardown failure needs to show up. Prints one line per failure and a
one-line summary; exits 1 on any failure (or when
interrupted). The logs of failed runs stay in --logs.
"""
import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"

import ft_opt  # noqa: E402
from tests.lm_fixtures import save_tiny_lm, write_wikitext  # noqa: E402
from tests.helpers import free_port  # noqa: E402

# tests/scripts/test_ft_opt.py's torchrun settings: 2 transformer blocks, 54 training blocks of 32 tokens, 2 epochs
TRAIN = ["--seqlen", "32", "--lr", "3e-3", "--warmup-steps", "2", "--grad-accum", "3", "--epochs", "2",
         "--device", "cpu"]
CASES = ("fresh", "resume")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=200, help="torchrun runs in all, the two cases alternating")
    p.add_argument("--no-load", dest="load", action="store_false",
                   help="no busy process beside the runs (default: one)")
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time (each one 3 processes)")
    p.add_argument("--timeout", type=float, default=300, help="seconds one run may take")
    p.add_argument("--logs", help="folder for the assets and the logs of failed runs (default: a new temporary one)")
    return p.parse_args(argv)


def build_assets(root):
    """The tiny OPT model and corpus of the tests, and a checkpoint after epoch 1 of a one-process run
    (what the resumed case starts from), as test_torchrun_resumes_a_checkpoint makes it."""
    model, data = save_tiny_lm(os.path.join(root, "opt"), "opt"), write_wikitext(os.path.join(root, "wikitext"))
    checkpoint = os.path.join(root, "epoch1")
    real_save = ft_opt.atomic_save

    def save_then_stop(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt

    ft_opt.atomic_save = save_then_stop
    try:
        ft_opt.main(["--model", model, "--data-dir", data, *TRAIN, "--micro-bs", "6", "--out", checkpoint])
    except KeyboardInterrupt:
        pass
    finally:
        ft_opt.atomic_save = real_save
    return model, data, checkpoint


def run_once(case, out, model, data, checkpoint, timeout):
    """(ok, aborted, log text) of one 2-rank FSDP run into `out`."""
    args = ["--model", model, "--data-dir", data, *TRAIN, "--micro-bs", "3", "--out", out, "--fsdp"]
    if case == "resume":
        shutil.copytree(checkpoint, out)
        args.append("--resume")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={free_port()}", "ft_opt.py", *args]
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired as e:
        return False, False, f"timed out after {timeout:g} s\n{e.stdout or ''}\n{e.stderr or ''}"
    log = f"$ {' '.join(cmd)}\nexit code {res.returncode}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
    aborted = "terminate called" in res.stderr or "Signal 6 (SIGABRT)" in res.stderr
    finished = (res.stdout.count("perplexity after finetuning") == 1
                and os.path.exists(os.path.join(out, "metrics.json"))
                and not os.path.exists(os.path.join(out, "checkpoint.pt")))
    return res.returncode == 0 and not aborted and finished, aborted, log


def main(argv=None):
    args = parse_args(argv)
    logs = args.logs or tempfile.mkdtemp(prefix="stress_fsdp_teardown_")
    os.makedirs(logs, exist_ok=True)
    model, data, checkpoint = build_assets(os.path.join(logs, "assets"))
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.load else None
    done, failures, aborts, start = 0, 0, 0, time.time()

    def one(i):
        case = CASES[i % 2]
        out = os.path.join(logs, f"run{i + 1}_{case}")
        ok, aborted, log = run_once(case, out, model, data, checkpoint, args.timeout)
        if ok:
            shutil.rmtree(out, ignore_errors=True)
        else:
            with open(out + ".log", "w") as f:
                f.write(log)
            print(f"run {i + 1} ({case}) FAILED{' (abort)' if aborted else ''}: {out}.log", flush=True)
        return ok, aborted

    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
    try:
        for ok, aborted in pool.map(one, range(args.runs)):
            done, failures, aborts = done + 1, failures + (not ok), aborts + aborted
            if done % 10 == 0:
                print(f"{done}/{args.runs} runs, {failures} failed, {time.time() - start:.0f} s", flush=True)
    except KeyboardInterrupt:  # Ctrl-C: the runs under way finish, the summary counts the runs done
        print("interrupted", flush=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if load is not None:
            load.terminate()
            load.wait()
    wall = time.time() - start
    print(f"stress_fsdp_teardown: {done} runs of {args.runs} ({(done + 1) // 2} fresh, {done // 2} resumed), "
          f"{failures} failed, {aborts} aborted; {args.jobs} at a time, load: {'1 busy process' if args.load else 'none'}; "
          f"{wall:.0f} s ({wall / max(done, 1):.1f} s per run); logs in {logs}", flush=True)
    if failures == 0 and args.logs is None:
        shutil.rmtree(logs, ignore_errors=True)
    return 1 if failures or done < args.runs else 0


if __name__ == "__main__":
    sys.exit(main())
