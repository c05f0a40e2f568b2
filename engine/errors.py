"""User mistakes become one line on stderr and exit status 2, never a traceback.

Scripts raise `UserError` for anything the user can fix (unknown name, missing file, bad value) and
wrap their entry point with `cli(main)`. `UserError` subclasses `ValueError`, so library code
(`losses.get_loss`, `quant.quantize`, ...) can raise it where a plain `ValueError` is the documented
contract, and scripts still print it as one line.
"""
import argparse
import sys


class UserError(ValueError):
    """An error caused by the user's input; its message is the whole report."""


def cli(main, argv=None):
    """Run `main(argv)`; turn a `UserError` into `error: MESSAGE` on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def require_positive_ints(args, *names):
    """UserError for any named integer flag of `args` below 1 (None means unset and passes)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help: argparse's '(default: X)', unless the help text already says what the
    default is (defaults that depend on other flags are None until the script resolves them)."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors raised as UserError: one line and exit 2 through `cli`, not a usage dump;
    --help shows every default (HelpFormatter)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        raise UserError(message)
