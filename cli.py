"""What every entry point's command line shares, free of torch (so that --help and a bad flag answer at once):
one-line flag errors and help texts that show each default."""

from __future__ import annotations

import argparse


class OneLineErrors(argparse.ArgumentParser):
    """A bad flag is one line on stderr and exit code 2 (argparse would print its usage block first)."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see python {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help text, except a None default: that help says what None means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)
