"""Append-only CSV metric logs with a fixed header (one row per epoch / eval / log interval).

Rows are written and flushed one at a time so a killed run keeps every finished row; opening an
existing file with the same header (a resumed run) appends to it.
"""
import csv
import os

from .io import _atomic


class CSVLogger:
    def __init__(self, path, fields):
        self.path = os.fspath(path)
        self.fields = list(fields)
        if os.path.exists(self.path):
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), None)
            if header != self.fields:
                raise ValueError(f"{self.path} has columns {header}, expected {self.fields}")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)

    def log(self, **row):
        unknown = set(row) - set(self.fields)
        if unknown:
            raise KeyError(f"unknown metric columns {sorted(unknown)}")
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)

    def truncate_after(self, key, value):
        """Drop rows whose `key` column exceeds `value` (a resumed run re-logs those rows)."""
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if float(r[key]) <= value]
        def write(f):
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(rows)

        _atomic(self.path, write, "w")


def read_csv(path):
    """Rows of a metrics CSV as dicts of floats (non-numeric cells kept as strings)."""
    def parse(v):
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(f)]
