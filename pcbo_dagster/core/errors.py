"""Errors that map to the CLI's exit statuses (CONTRACT section 3)."""

from __future__ import annotations

from typing import Any


def _rebuilt(cls: type[PcboError], args: tuple[Any, ...], state: dict[str, Any]) -> PcboError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class PcboError(Exception):
    """Base class. `exit_status` is what the CLI exits with."""

    exit_status = 1

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled whole, whatever a subclass's `__init__` takes: an error raised in a worker process
        (`ledger_archives`' decoding) reaches the caller as itself (an `InvalidInput` unpickled by
        `Exception`'s default, its message as the only argument, broke the process pool)."""
        return (_rebuilt, (type(self), self.args, dict(self.__dict__)))


class InvalidInput(PcboError):
    """Bad input: exit status 2, nothing written. `field` names the offending field (a JSON path)."""

    exit_status = 2

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class Blocked(PcboError):
    """A gate held: exit status 3, nothing written. `document` is printed as the command output."""

    exit_status = 3

    def __init__(self, message: str, document: dict[str, Any]) -> None:
        self.document = document
        super().__init__(message)


class IntegrityError(PcboError):
    """A post-write check or verification failed: exit status 1."""

    exit_status = 1


class SourceChanged(IntegrityError):
    """Records read again to be written are not the ones that were decided on: the source changed
    during the run (exit status 1; nothing is committed from the change on)."""


class Terminated(KeyboardInterrupt):
    """A SIGTERM asking a `pcbo` command to stop (`cli.main.run` turns the signal into this): handled
    as a Ctrl-C is — one line, the run recorded `interrupted` — and the process then ends by SIGTERM."""


def interrupting_signal(exc: BaseException) -> str:
    """The name of the signal a `KeyboardInterrupt` stands for: `SIGTERM` (`Terminated`) or `SIGINT`."""
    return "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
