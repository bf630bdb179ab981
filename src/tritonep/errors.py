"""Exception classes of tritonep (reference §2).

Each class also derives from the exception family DeepEP V1 raised for the same failure
(`AssertionError` for Python-side checks, `RuntimeError` for C++ checks), so V1-era `except`
clauses keep catching them.
"""


class EPError(RuntimeError):
    """Base of every tritonep error."""


class EPInvalidArgument(EPError, ValueError, AssertionError):
    """An argument has a bad value, shape, dtype, stride or device."""


class EPUnsupported(EPInvalidArgument, NotImplementedError):
    """Valid in principle, but not supported by this build, backend or device."""


class EPStateError(EPError, AssertionError):
    """The object is in the wrong state (destroyed buffer, wrong mode, missing event, ...)."""


class EPTimeoutError(EPError, TimeoutError):
    """A host or device wait exceeded `TRITONEP_TIMEOUT_S`; the message names rank, phase and
    peer."""
