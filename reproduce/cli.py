"""The command line: plan every requested section's runs, run them in --jobs processes, cache each section's
raw results, and write the report from every section in the cache."""
import datetime
import hashlib
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from types import SimpleNamespace

from engine import ArgumentParser, UserError, atomic_save, atomic_write_text

from . import SECTIONS
from .common import SHARED_UCI, SHARED_VISION
from .report import Section, claim, headline_block, markdown, update_readme

FORMAT = 2  # of the cached results: a cache of another format (an older reproduce.py) is never read


def _init_worker():
    import torch

    torch.set_num_threads(1)  # one process per core: independent runs in parallel, not threads


def _timed_call(fn, kwargs):
    start = time.time()
    return fn(**kwargs), time.time() - start


def _completed(pending, jobs):
    """Yield (key, result, seconds) as each pending task {key: (fn, kwargs, path)} ends: one job runs them in this
    process (no second interpreter to start and import torch into), more in `jobs` spawned processes."""
    if jobs == 1:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for key, (fn, kwargs, _) in pending.items():
                yield key, *_timed_call(fn, kwargs)
        finally:
            torch.set_num_threads(threads)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that already holds torch's threads
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker) as pool:
        futures = {pool.submit(_timed_call, fn, kwargs): key for key, (fn, kwargs, _) in pending.items()}
        for future in as_completed(futures):
            yield futures[future], *future.result()


def task_path(cache, key, fn, kwargs):
    """Where the result of task `key` = (section, key, index) is kept: under cache/tasks/<section>/, named by a
    digest of the task's function and arguments (a task whose arguments change is a new task)."""
    text = repr((key, fn.__module__, fn.__qualname__, sorted(kwargs.items())))
    text = text.replace(os.path.abspath(cache), "<cache>").replace(cache, "<cache>")  # the same key wherever it lives
    return os.path.join(cache, "tasks", key[0], hashlib.sha1(text.encode()).hexdigest()[:20] + ".pt")


def run_tasks(tasks, jobs, cache, section_done):
    """Run every task {(section, key, index): (fn, kwargs)} in `jobs` processes; {key: result}. Each result is
    kept in the cache as it comes (task_path) and a task found there is not run again, so an interrupted run
    resumes. As soon as a section's last task is done, section_done(section, results, seconds) gets the
    results so far and that section's summed task seconds (recorded ones for tasks found in the cache)."""
    results, seconds, pending = {}, {}, {}
    for key, (fn, kwargs) in tasks.items():
        path = task_path(cache, key, fn, kwargs)
        seconds.setdefault(key[0], 0.0)
        if os.path.exists(path):
            saved = load_cache(path)
            results[key] = saved["result"]
            seconds[key[0]] += saved["seconds"]
        else:
            pending[key] = (fn, kwargs, path)
    print(f"reproduce: {len(tasks) - len(pending)} of {len(tasks)} runs found in {cache}, {len(pending)} to run in "
          f"{jobs} processes", flush=True)
    left = {section: 0 for section in seconds}
    for key in pending:
        left[key[0]] += 1
    for section in [s for s, n in left.items() if not n]:
        section_done(section, results, seconds[section])
    for key, value, took in _completed(pending, jobs):
        atomic_save(dict(result=value, seconds=took), pending[key][2])
        results[key] = value
        seconds[key[0]] += took
        print(f"  done {key[0]} {key[1]} {key[2]} ({took:.0f}s)", flush=True)
        left[key[0]] -= 1
        if not left[key[0]]:
            section_done(key[0], results, seconds[key[0]])
    return results


def group(results, section):
    """{key: [result per fold / seed, in index order]} of one section."""
    out = {}
    for (_, key, _), value in sorted(((k, v) for k, v in results.items() if k[0] == section),
                                     key=lambda kv: str(kv[0][2])):
        out.setdefault(key, []).append(value)
    return out


def config(module, args):
    cfg = dict(seeds=args.seeds or (2 if args.quick else 5))
    cfg.update(module.QUICK if args.quick else module.FULL)
    return cfg


def cifar_note(cifar_dir):
    found = [d for d in ("cifar-10-batches-py", "cifar-100-python") if os.path.isdir(os.path.join(cifar_dir, d))]
    if found:
        return (f"data found in {cifar_dir}/ ({', '.join(found)}): run `python train.py --dataset cifar10 --net res18 "
                f"--loss LOSS --data-dir {cifar_dir}` per row (200 epochs each: GPU-sized, not part of this CPU "
                f"report)")
    return (f"not run: no CIFAR data in {cifar_dir}/ (cifar-10-batches-py/, cifar-100-python/; pass --cifar-dir); "
            f"with the data, `python train.py --dataset cifar10 --net res18 --loss LOSS` per row")


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every section at a tiny size (what the tests run)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), help=f"any of: {', '.join(SECTIONS)}")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel processes (default: the cores)")
    p.add_argument("--n-seeds", dest="seeds", type=int, default=None,
                   help="number of seeds, and of CV folds, per row (default 5; quick 2)")
    p.add_argument("--out", default="reproduction", help="figures (default %(default)s)")
    p.add_argument("--report", default=None,
                   help="the markdown report (default REPRODUCTION.md, or OUT/REPRODUCTION.md with --quick)")
    p.add_argument("--readme", default=None, help="also update the headline table quoted in this README")
    p.add_argument("--cache", default=None, help="each section's raw results, train.py and llm_pipeline.py run "
                                                 "folders; the report holds every section found here (default "
                                                 "reproduction/cache, kept in the repository, or OUT/cache with "
                                                 "--quick)")
    p.add_argument("--data-dir", default=SHARED_UCI, help="UCI files (default ../shared/data/uci)")
    p.add_argument("--vision-dir", default=SHARED_VISION, help="image data sets in train.py's layouts: "
                   "FashionMNIST/raw/ (default ../shared/data/vision)")
    p.add_argument("--cifar-dir", default="data", help="where train.py would find CIFAR (only reported)")
    args = p.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        raise UserError(f"unknown section {unknown[0]!r}; choose from: {', '.join(SECTIONS)}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    if args.seeds is not None and args.seeds < 2:
        raise UserError(f"--n-seeds must be >= 2 (a confidence interval needs two runs), got {args.seeds}")
    if args.report is None:
        args.report = os.path.join(args.out, "REPRODUCTION.md") if args.quick else "REPRODUCTION.md"
    if args.cache is None:
        args.cache = os.path.join(args.out, "cache") if args.quick else os.path.join("reproduction", "cache")
    args.command = result_command(argv if argv is not None else sys.argv[1:])
    return args


# Flags that only say where files go: left out of the command a section's results are credited to.
LOCATION_FLAGS = ("--out", "--report", "--readme", "--cache")


def result_command(words):
    """The command line as it determines the results: the words minus LOCATION_FLAGS and their values."""
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in LOCATION_FLAGS:
            skip = True
        elif not word.startswith(tuple(f + "=" for f in LOCATION_FLAGS)):
            kept.append(word)
    return " ".join(["python reproduce.py", *(shlex.quote(w) for w in kept)])


def pending(name, cache, command):
    """The report's section `name` when `cache` holds no results of it: its claim, and what runs it."""
    return Section(name, SECTIONS[name].TITLE, claim(name), f"Not run yet: `{cache}` holds no results of this "
                   f"section at this size; `{command}` runs it.", command,
                   headline=[[SECTIONS[name].TITLE, "", "", "pending: not run", "", "", "", "pending"]])


def load_cache(path):
    import torch

    return torch.load(path, weights_only=False)  # our own file, written by atomic_save in main


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    # a section run alone may use every process inside its task (the LLM pipeline's own pool); beside others, one
    ctx = SimpleNamespace(data_dir=args.data_dir, vision_dir=args.vision_dir, cache=args.cache, out=args.out,
                          cifar_note=cifar_note(args.cifar_dir), jobs=args.jobs if len(args.sections) == 1 else 1)
    start = time.time()
    tasks, cfgs = {}, {}
    for name in args.sections:
        cfgs[name] = config(SECTIONS[name], args)
        tasks.update({(name, key, index): job for (key, index), job in SECTIONS[name].tasks(cfgs[name], ctx).items()})
    # The pool takes tasks in submission order: the longest sections first, so no process idles at the end.
    longest = ("llm", "fashion", "gan_images", "digits", "gan")
    tasks = {key: tasks[key] for key in sorted(tasks, key=lambda t: longest.index(t[0]) if t[0] in longest else len(longest))}

    def save(name, results, seconds):  # a section's raw results, so a later --sections run keeps the others
        grouped = group(results, name)
        if hasattr(SECTIONS[name], "core_seconds"):  # a section whose task runs its own processes counts them
            seconds = SECTIONS[name].core_seconds(grouped)
        atomic_save(dict(format=FORMAT, quick=args.quick, cfg=cfgs[name], results=grouped, seconds=seconds,
                         date=datetime.date.today().isoformat(), command=args.command),
                    os.path.join(args.cache, f"{name}.pt"))

    run_tasks(tasks, args.jobs, args.cache, save)
    sections, provenance = [], []
    for name, module in SECTIONS.items():
        path = os.path.join(args.cache, f"{name}.pt")
        saved = load_cache(path) if os.path.exists(path) else None
        command = f"python reproduce.py{' --quick' if args.quick else ''} --sections {name}"
        if saved is None or saved.get("format") != FORMAT or saved["quick"] != args.quick:
            # never run at this size (or by this code): listed as pending, with the command that runs it
            sections.append(pending(name, args.cache, command))
            provenance.append((name, "not run", 0.0, command))
            continue
        sections.append(module.report(saved["cfg"], saved["results"], ctx, command))
        provenance.append((name, saved["date"], saved["seconds"], saved["command"]))
    atomic_write_text(args.report, markdown(sections, provenance, args, time.time() - start) + "\n")
    if args.readme:
        update_readme(args.readme, sections, provenance)
    print(f"wrote {args.report} ({time.time() - start:.0f}s); figures in {args.out}/")
    print("\n".join(headline_block(sections, provenance)))
    return sections
