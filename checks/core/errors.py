"""Every error lmaudit raises derives from :class:`LmAuditError`, so callers can catch one root."""

from __future__ import annotations


class LmAuditError(Exception):
    """Root of every error lmaudit raises on purpose."""


class ModelLoadError(LmAuditError):
    """A model spec could not be resolved or loaded (unknown alias, missing file, offline hub id)."""


class UnsupportedArchitectureError(LmAuditError):
    """The adapter could not find the modules it needs; the message names what it looked for."""


class AuditFileError(LmAuditError):
    """A malformed audit file: the message names the file, the key and the valid choices."""


class NonFiniteOutputError(LmAuditError):
    """The model produced NaN or inf where a finite number was required; when it can, the message names the first
    module (embedding, decoder layer, final norm, unembedding) whose output was not finite."""


class CacheEntryError(LmAuditError):
    """A cache entry (a dequantized GGUF model, a LoRA fine-tune) is corrupt or incomplete and could not be rebuilt;
    the message names the entry's path, to delete by hand."""


class CorpusError(LmAuditError):
    """A corpus cannot be read (not UTF-8 text, a binary file) or was asked for in two conflicting ways; the message
    names the file or the arguments."""


class CorpusNotFoundError(CorpusError):
    """A named corpus is not available on this machine, or an explicit corpus path does not exist; the message says
    where it was looked for."""


class DataUnavailableError(LmAuditError):
    """Optional data (``../shared/data`` or ``$LMAUDIT_DATA``) is absent on this machine. Audits that need it are
    reported as skipped, not failed, so that a fresh clone still passes."""


class CorpusDataMissing(CorpusNotFoundError, DataUnavailableError):
    """A named corpus that lives in the optional data folder is not there (and no explicit path was given)."""


class PremiseMissing(LmAuditError):
    """A claim cannot be checked on this model because its premise is absent (e.g. no super weight survives the
    detector's confirmation, so there is nothing to prune). Audits that raise it are *skipped* with this reason
    on their row, never passed; the message says what was looked for and what was found."""
