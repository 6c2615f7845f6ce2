"""Console logging for the entry points: the rank in every record, megatron-core's noise in one line.

    from megafusion.logging_setup import configure_logging, megatron_warnings

    configure_logging()                      # once, by an entry point (train, eval, generate, ...)
    with megatron_warnings() as noise:       # around megatron imports and model building
        ...
        noise.summarize()                    # one line: how many were collapsed, and how to see them

Library modules only call ``logging.getLogger(__name__)``; nothing here runs at import, and
the only state is logging's own registry (the handler :func:`configure_logging` installs on
the root logger, marked so that a second call replaces it instead of adding another).

Records are ``HH:MM:SS [rank R] message`` (INFO) or ``HH:MM:SS [rank R] WARNING name: message``;
INFO and below go to stdout, WARNING and above to stderr. Rank 0 logs from INFO, the other ranks
from WARNING (every rank would print the same progress line).

megatron-core (0.19) warns at import and while building a model that Transformer Engine and
Apex are absent (it falls back to torch's optimizers and norms, which is what megafusion uses
on CPU) and about deprecations of APIs megafusion does not call. :func:`megatron_warnings`
records the ``warnings`` raised from megatron's own files, and the WARNING records of its
``megatron.*`` loggers, instead of printing a page of them, and says how many in one line.
Warnings raised by any other code (megafusion's included) are shown as usual, when raised.
``MEGAFUSION_SHOW_WARNINGS=1`` turns the collapsing off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import sysconfig
import warnings
from typing import Iterator

SHOW_WARNINGS_ENV = "MEGAFUSION_SHOW_WARNINGS"
_HANDLER_MARK = "_megafusion_handler"


def process_rank() -> int:
    """This process's global rank: torch.distributed's once initialised, else the launcher's RANK."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class RankFormatter(logging.Formatter):
    """``HH:MM:SS [rank R] message``; records above INFO also name their level and logger."""

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        head = f"{self.formatTime(record, self.datefmt)} [rank {process_rank()}]"
        if record.levelno > logging.INFO:
            head += f" {record.levelname} {record.name}:"
        text = f"{head} {record.message}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def configure_logging(rank: int | None = None, level: int | None = None) -> None:
    """Installs megafusion's console handlers on the root logger (replacing ones installed by an
    earlier call, leaving any other handler alone). ``level``: default INFO on rank 0 and WARNING
    elsewhere. Called by entry points only; importing megafusion configures nothing."""
    rank = process_rank() if rank is None else rank
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_Below(logging.WARNING))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(RankFormatter())
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
    level = level if level is not None else logging.INFO if rank == 0 else logging.WARNING
    root.setLevel(level)
    # megatron-core logs its own INFO chatter (per layer, per bucket): kept out unless asked for.
    logging.getLogger("megatron").setLevel(max(level, logging.WARNING) if level > logging.DEBUG else level)


def show_warnings() -> bool:
    return os.environ.get(SHOW_WARNINGS_ENV, "") not in ("", "0")


def _is_megatron_file(filename: str) -> bool:
    parts = filename.replace("\\", "/").split("/")
    return "megatron" in parts


def _from_megatron(filename: str) -> bool:
    """Whether a warning raised in ``filename`` comes from megatron-core: raised in its files, or
    in torch's (e.g. torch.distributed.checkpoint's) called from megatron's (its checkpointing)."""
    if _is_megatron_file(filename):
        return True
    if "torch" not in filename.replace("\\", "/").split("/"):
        return False
    stdlib = sysconfig.get_paths()["stdlib"]
    frame = sys._getframe(1)
    while frame is not None:
        where = frame.f_code.co_filename
        if _is_megatron_file(where):
            return True
        parts = where.replace("\\", "/").split("/")
        passing = ("torch" in parts or where == __file__ or where.startswith("<")
                   or (where.startswith(stdlib) and "site-packages" not in parts))
        if not passing:  # the first caller outside torch and the standard library: not megatron
            return False
        frame = frame.f_back
    return False


class MegatronNoise:
    """What :func:`megatron_warnings` collapsed: ``messages`` (first line of each, in order)."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._summarized = False

    def __len__(self) -> int:
        return len(self.messages)

    def add(self, message: str) -> None:
        self.messages.append(str(message).strip().splitlines()[0] if str(message).strip() else "")

    def summary(self) -> str | None:
        """One line (None when nothing was collapsed)."""
        if not self.messages:
            return None
        text = " ".join(self.messages).lower()
        causes = []
        if "transformer engine" in text or "apex" in text:
            causes.append("Transformer Engine and Apex absent: torch optimizers and norms")
        if "deprecat" in text:
            causes.append("deprecations")
        if "experimental" in text:
            causes.append("experimental APIs")
        distinct = len(set(self.messages))
        what = f"{len(self.messages)} warning{'s' if len(self.messages) != 1 else ''}"
        if distinct != len(self.messages):
            what += f" ({distinct} distinct)"
        reason = f" ({'; '.join(causes)})" if causes else ""
        return f"megatron-core: {what}{reason}; set {SHOW_WARNINGS_ENV}=1 to see them"

    def summarize(self, log: logging.Logger | None = None) -> None:
        """Logs :meth:`summary` once (at INFO); warnings collapsed after it are only counted
        (``len(noise)``, ``noise.messages``)."""
        log = log or logging.getLogger("megafusion")
        line = self.summary()
        if line is not None and not self._summarized:
            log.info(line)
        self._summarized = True


class _MegatronRecords(logging.Filter):
    """On megatron's loggers: WARNING (and lower) records are collapsed into ``noise``."""

    def __init__(self, noise: MegatronNoise) -> None:
        super().__init__()
        self.noise = noise

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("megatron") and record.levelno <= logging.WARNING:
            if record.levelno == logging.WARNING and not getattr(record, "_megafusion_counted", False):
                record._megafusion_counted = True  # the filter sits on every handler: count a record once
                self.noise.add(record.getMessage())
            return False
        return True


@contextlib.contextmanager
def megatron_warnings() -> Iterator[MegatronNoise]:
    """Collapses megatron-core's warnings during the block (see the module docstring).

    ``warnings`` raised from a file under a ``megatron`` package (or in torch, called from
    one: torch.distributed.checkpoint's, under megatron's checkpointing) are recorded, not shown;
    every other warning is shown at once, through the ``showwarning`` in place before the
    block. Records of ``megatron.*`` loggers at WARNING and below are dropped from the
    console handlers (WARNING ones counted). With ``MEGAFUSION_SHOW_WARNINGS=1`` nothing
    is collapsed. Call ``noise.summarize()`` where the start-up is done; leaving the block
    summarizes if that was not done yet.
    """
    noise = MegatronNoise()
    if show_warnings():
        yield noise
        return
    records = _MegatronRecords(noise)
    handlers = list(logging.getLogger().handlers) or [logging.lastResort]
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if _from_megatron(filename):
                noise.add(str(message))
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        # Every megatron warning is seen once here (its own "default" filters would show each
        # once per place; "always" lets the count be honest) -- other code keeps its filters.
        warnings.filterwarnings("always", module=r"megatron(\.|$)")
        for handler in handlers:
            handler.addFilter(records)
        try:
            yield noise
        finally:
            for handler in handlers:
                handler.removeFilter(records)
    noise.summarize()
