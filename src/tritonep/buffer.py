"""Buffer (being written)."""
from .config import Config  # noqa: F401
from .event import EventHandle, EventOverlap  # noqa: F401


class Buffer:
    num_sms: int = 20
