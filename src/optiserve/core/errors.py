"""One root error; each subclass takes structured arguments and builds a message that says what
failed, the offending value, and what to do. They know no protocol: faces map classes to exit
codes (cli/main.py) and to HTTP statuses and gRPC codes (server/errors.py), one table each."""

from __future__ import annotations

from collections.abc import Iterable


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


class OptiserveError(Exception):
    """Root of every error a user can cause or fix. Never raised for our own bugs."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(sentences(message, hint) if hint else message)


def sentences(*parts: str) -> str:
    """Parts joined as sentences: one that does not end like a sentence (a command such as
    `optiserve register NAME FILE`, a quoted value) gets a full stop before the next."""
    out = ""
    for part in (p.strip() for p in parts if p and p.strip()):
        if out:
            out += (" " if out[-1] in ".!?:;)" else ". ")
        out += part
    return out


class ConfigError(OptiserveError):
    """A setting or option is out of range or unknown."""


class MissingExtraError(OptiserveError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str, feature: str):
        super().__init__(
            f"{feature} needs the Python package '{module}', which is not installed.",
            hint=f"Install it with: pip install 'optiserve[{extra}]'",
        )
        self.module, self.extra, self.feature = module, extra, feature


class ModelNotFound(OptiserveError):
    def __init__(self, name: str, version: int | None = None, known: Iterable[str] = (),
                 detail: tuple[str, str] | None = None):
        if detail is not None:  # the model exists, but nothing usable was found
            OptiserveError.__init__(self, detail[0], hint=detail[1])
            self.name, self.version = name, version
            return
        what = f"model '{name}'" + (f" version {version}" if version is not None else "")
        known = sorted(known)
        hint = (
            f"Known models: {', '.join(known)}." if known else "The registry has no models yet."
        ) + " Register one with: optiserve register NAME FILE"
        super().__init__(f"No {what} in the registry.", hint=hint)
        self.name, self.version = name, version


class RunNotFound(OptiserveError):
    def __init__(self, run_id: str):
        super().__init__(f"No optimization run '{run_id}'.",
                         hint="Run ids look like opt-1a2b3c4d5e6f.")


class ArtifactNotFound(OptiserveError):
    def __init__(self, artifact_id: str):
        super().__init__(f"No artifact '{artifact_id}'.",
                         hint="Artifact ids look like MODEL-vVERSION, e.g. churn-v2; "
                         "GET /api/v1/models/MODEL lists them.")


class ModelLoadError(OptiserveError):
    """A model file is unknown, corrupted, or not what its extension says."""

    def __init__(self, path: str, reason: str, hint: str | None = None):
        super().__init__(f"Cannot load model '{path}': {reason}.", hint=hint)
        self.path, self.reason = path, reason


class ConversionError(OptiserveError):
    """A model could not be converted, or the converted model disagrees with the original."""


class UnknownNameError(OptiserveError):
    """A name (pass, runtime, data source, option) that is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        super().__init__(
            f"Unknown {kind} '{name}'.", hint=f"Choose one of: {', '.join(sorted(known))}."
        )
        self.kind, self.name = kind, name


class DatasetError(OptiserveError):
    """Validation or calibration data that cannot be read or does not fit the model."""


class SQLRefusedError(DatasetError):
    """A query that is not a single read-only SELECT."""

    def __init__(self, query: str, reason: str):
        short = " ".join(query.split())[:80]
        super().__init__(
            f"Refused SQL query '{short}': {reason}.",
            hint="Validation data is read with a single SELECT (or WITH ... SELECT) statement.",
        )


class SignatureMismatchError(DatasetError):
    """Validation data whose columns, shapes or dtypes do not match the model's inputs."""


class GateFailedError(OptiserveError):
    """No candidate kept enough accuracy. Carries the report so faces can still show it."""

    def __init__(self, message: str, report: object):
        super().__init__(message)
        self.report = report


class OptimizationTimeout(OptiserveError):
    """A run passed OPTIMIZATION_MAX_TIME_MINUTES before any candidate was measured."""


class ConflictError(OptiserveError):
    """The request is valid but the resource's state forbids it (a model in use, a finished
    job cancelled)."""


class UnsupportedUpload(OptiserveError):
    """An upload whose content the server will not take (a pickle over the network)."""


class PayloadTooLarge(OptiserveError):
    """A request body over the server's limit."""


class StorageFull(OptiserveError):
    """The server's disk (or the database's) has no room for what a request must write."""

    def __init__(self):
        super().__init__("The server has no space left to store what this request writes.",
                         hint="Free space on the server (OPTISERVE_HOME, the temp folder, the "
                         "database), or ask its operator; GET /api/v1/health shows storage.")


class BodyTimeout(OptiserveError):
    """The client stopped sending its body (a slow-body attack, or a client that hung)."""


class AuthError(OptiserveError):
    """No API key, or one that is wrong or revoked."""


class ScopeError(OptiserveError):
    """A valid key without the scope an endpoint needs."""
