"""`make reproduce`: the thin command line of the `reproduce` package (see reproduce/__init__.py).

    python reproduce.py                                   # everything, REPRODUCTION.md + reproduction/
    python reproduce.py --quick --out runs/reproduce_quick # every section at a tiny size (about 1 min)
    python reproduce.py --sections table1 gan --jobs 2    # rerun some sections (the report keeps the others)
"""
from engine import cli
from reproduce.cli import main

if __name__ == "__main__":
    cli(main)
