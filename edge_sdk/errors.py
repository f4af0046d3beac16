"""Exception tree of the edge SDK.

Every error the SDK raises on purpose derives from :class:`FedserError`, so a
caller can catch the SDK's failures without catching programming errors.
The message always names the offending value.
"""

from __future__ import annotations


class FedserError(Exception):
    """Base class of every error fedser raises on purpose."""


class ParameterError(FedserError, ValueError):
    """A parameter or input has a bad value (shape, range, type)."""


class AudioError(FedserError):
    """Audio could not be read, decoded or captured."""


class RuntimeUnavailableError(FedserError):
    """No TFLite runtime (ai-edge-litert or tflite-runtime) can be imported."""


class ModelError(FedserError):
    """A model file or its metadata is missing, malformed or inconsistent."""


class WireFormatError(FedserError, ValueError):
    """Bytes on the wire do not follow the update or manifest format."""


class SignatureError(WireFormatError):
    """A signature does not verify against the pinned or registered key."""


class StorageFullError(FedserError):
    """The disk holding the device's state is full: what was being written was not (and nothing was half-written).
    The message names the folder, the space left and what to do."""


class StateBusyError(FedserError):
    """Another process holds the device's state folder (:class:`edge_sdk.storage.StateLock`).

    Attributes
    ----------
    holder : dict or None
        What the holder wrote about itself (``pid``, ``command``, ``since``), ``None`` when it could not be read.
    """

    def __init__(self, message: str, *, holder: dict | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class ServerError(FedserError):
    """The aggregator refused a request or could not be reached.

    Attributes
    ----------
    status : int or None
        HTTP status code, ``None`` when no response came back.
    reason : str
        Machine-readable refusal reason from the server's JSON body.
    """

    def __init__(self, message: str, *, status: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
