"""What the tool tells the user on stderr while it works: phase banners, step lines, warnings.
`--quiet` keeps only warnings, errors and the final results (stdout)."""

from __future__ import annotations

import sys

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence banners, step lines and library chatter (progress bars are passed progress=False)."""
    global _quiet
    _quiet = quiet
    if quiet:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        for name in ("transformers", "peft", "huggingface_hub", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)


def quiet() -> bool:
    return _quiet


def say(message: str) -> None:
    """One progress line ("evaluating base model", a step line), unless --quiet."""
    if not _quiet:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)  # above any progress bar, not through it


def warn(message: str) -> None:
    """A problem the user should know about even with --quiet (the run goes on)."""
    print(f"safedistill: warning: {message}", file=sys.stderr, flush=True)
