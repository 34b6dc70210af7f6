"""moekit's error hierarchy. Library code raises these (or plain ValueError/TypeError for programming
mistakes); only the command line formats them, as one line, with exit code 2 for usage errors and 1
for failures (`MOEKIT_DEBUG=1` shows the traceback).

  MoekitError                   base: a message meant for people, one line
    UsageError (ValueError)     a bad setting, flag or argument: what was given and what is allowed
    DataError (ValueError)      a file that is damaged, truncated, of another version or not moekit's
    NotOwnedError (FileExistsError)
                                moekit refuses to write into or replace a directory it did not create

Errors of one subsystem subclass these and keep the base class they had before the hierarchy, so
that `except RuntimeError` / `except ValueError` written against older moekit still catches them:
ExpertStoreError (DataError, RuntimeError), PrefetchError (MoekitError, RuntimeError),
TraceFormatError (DataError), ExportError (UsageError; ExportVerificationError exits 1),
UnsupportedBlockError (UsageError).
"""

from __future__ import annotations


class MoekitError(Exception):
    """Base class of every error moekit raises on purpose."""

    exit_code = 1


class UsageError(MoekitError, ValueError):
    """A setting, flag or argument is invalid; the message names it and what was expected."""

    exit_code = 2


class DataError(MoekitError, ValueError):
    """A file moekit reads is damaged, truncated, of an unknown version or not a moekit file."""


class NotOwnedError(MoekitError, FileExistsError):
    """A directory exists with contents moekit did not write: it is never overwritten or deleted."""

    exit_code = 2
