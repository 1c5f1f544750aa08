"""A command's process from start to exit: settings made before any work, signals that stop it as Ctrl-C does, one
line per error (a traceback only with --debug) and an exit that skips the native libraries' slow teardown."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.exceptions import ClickException  # typer's own click, whose usage errors show their usage

from pipeline.runtime import configure_process, drop_decoder_lines
from stages.errors import Interrupted, PipelineError

# Commands that never run a backbone: they work on cached features (or on none), with glibc's allocator defaults.
CACHED_FEATURES_ONLY = {"train-head", "lr-find", "audit", "runs", "store", "inspect"}
DECODING = {"featurize", "predict", "evaluate", "inspect", "finetune", "demo"}  # commands that decode images here
INTERRUPTED = 130  # the shell's code for a command stopped by SIGINT

err = Console(stderr=True, soft_wrap=True)


@contextmanager
def on_interrupt(kept):
    """Ctrl-C (or SIGTERM) inside the block ends the command with one line saying what was kept (a text, or a
    function that says it when asked)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(kept() if callable(kept) else kept) from None


def nothing_written(out: Path | None) -> str:
    """What an interrupted command that writes `out` only at its end kept."""
    return f"nothing was written ({out} is as it was)" if out is not None else "nothing was written"


def _on_signal(signum, frame):
    """SIGTERM (and the timer below) stop a command as Ctrl-C does: a KeyboardInterrupt in the main thread."""
    raise KeyboardInterrupt


def _on_unraisable(unraisable) -> None:
    """A KeyboardInterrupt that lands in a destructor or a weakref callback is swallowed there (Python can only
    report it): raise it again a moment later, in the command's own flow, so that an interrupt is never lost."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        signal.setitimer(signal.ITIMER_REAL, 0.01)
    else:
        sys.__unraisablehook__(unraisable)


def _exit(code: int) -> None:
    """Exit at once: Python's exit handlers run and output is flushed, but the native libraries' own teardown
    (measured 1.6 s for DALI, torch and CUDA's, after featurize has printed its summary) is skipped. Everything
    written is already closed and fsynced by then."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _starts_ray(argv: list[str]) -> bool:
    """Whether the command line asks for Ray (featurize --engine ray), whose processes must keep the real stderr."""
    return "--engine=ray" in argv or any(a == "--engine" and b == "ray" for a, b in zip(argv, argv[1:]))


def run(app: typer.Typer) -> None:
    """Run the command line's command of `app` and exit: one-line errors without traceback unless --debug is given
    anywhere on the command line."""
    configure_process(forward=not CACHED_FEATURES_ONLY & set(sys.argv[1:2]))
    if DECODING & set(sys.argv[1:2]) and not _starts_ray(sys.argv):  # one note per unreadable file, no raw lines
        drop_decoder_lines()
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv.remove("--debug")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGALRM, _on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.unraisablehook = _on_unraisable
    try:
        code = app(standalone_mode=False)  # returns the exit code of typer.Exit and --help
    except PipelineError as exc:
        if debug:
            traceback.print_exc()
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        _exit(1)
    except Interrupted as exc:
        err.print(f"interrupted: {escape(str(exc))}", highlight=False, soft_wrap=True)
        _exit(INTERRUPTED)
    except KeyboardInterrupt:  # before a command began its work
        err.print("interrupted: nothing was written", highlight=False)
        _exit(INTERRUPTED)
    except typer.Exit as exc:
        _exit(exc.exit_code)
    except ClickException as exc:  # a malformed command line: click shows it with the usage
        exc.show()
        _exit(exc.exit_code)
    except typer.Abort:  # click's Ctrl-C outside a command's work
        err.print("interrupted: nothing was written", highlight=False)
        _exit(INTERRUPTED)
    except Exception as exc:  # the unexpected
        if debug:
            traceback.print_exc()
            _exit(1)
        err.print(
            f"[red]error:[/] {type(exc).__name__}: {escape(str(exc))} (rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        _exit(1)
    _exit(code if isinstance(code, int) else 0)
