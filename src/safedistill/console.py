"""What the tool tells the user on stderr while it works: phase banners, step lines, warnings.
`--quiet` keeps only warnings, errors and the final results (stdout)."""

from __future__ import annotations

import os
import sys

_quiet = False
_bars = True


def set_quiet(quiet: bool, *, tty: bool | None = None) -> None:
    """Silence banners, step lines and library chatter (progress bars are passed progress=False).
    Progress bars also stay off when stderr is no terminal (`tty`, default: asked), so that a
    redirected log holds lines, not carriage-return redraws; the libraries' bars with them."""
    global _quiet, _bars
    _quiet = quiet
    _bars = not quiet and (sys.stderr.isatty() if tty is None else tty)
    if not _bars:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub and transformers at import
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        if "transformers" in sys.modules:
            from transformers.utils.logging import disable_progress_bar

            disable_progress_bar()
    if quiet:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        for name in ("transformers", "peft", "huggingface_hub", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)


def quiet() -> bool:
    return _quiet


def bars() -> bool:
    """Whether progress bars are drawn: not --quiet, and stderr is a terminal."""
    return _bars


def say(message: str) -> None:
    """One progress line ("evaluating base model", a step line), unless --quiet."""
    if not _quiet:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)  # above any progress bar, not through it


def warn(message: str) -> None:
    """A problem the user should know about even with --quiet (the run goes on)."""
    print(f"safedistill: warning: {message}", file=sys.stderr, flush=True)
