"""What every script shares and nothing else: user errors turned into one line and exit 2
(`errors`), the shared flags and run folders (`cli`), atomic writes of checkpoints and result files
(`io`), resume checkpoints (`checkpoint`), CSV metric logs (`metrics`), mean ± CI summaries over seeds
(`stats`), the supervised training step (`loop`), and torchrun setup (`distributed`, imported from there).
Anything specific to one task lives beside that task's script, not here."""
from .checkpoint import load_checkpoint, restore, rng_state, set_rng_state
from .cli import add_common_args, prepare_run_dir, run_args, set_threads
from .errors import ArgumentParser, UserError, cli, require_positive_ints
from .loop import resolve_amp
from .io import atomic_copy, atomic_dir, atomic_save, atomic_savefig, atomic_write_csv, atomic_write_json, atomic_write_text
from .metrics import CSVLogger, read_csv
from .stats import format_ci, mean_ci

__all__ = ["ArgumentParser", "UserError", "cli", "require_positive_ints", "add_common_args",
           "prepare_run_dir", "run_args", "set_threads", "load_checkpoint", "restore", "rng_state", "set_rng_state",
           "resolve_amp",
           "atomic_copy", "atomic_dir", "atomic_save", "atomic_savefig", "atomic_write_csv", "atomic_write_text", "atomic_write_json",
           "CSVLogger", "read_csv", "mean_ci", "format_ci"]
