from engine import cli
from reproduce.cli import main

cli(main)
