"""imageguard: WSGI/ASGI middleware that makes image serving safe to cache.

Every image served on a guarded path is validated and re-encoded before it is
cached or served; transform parameters are signed; cache keys are HMACs only the
server can mint. See README.md for set-up and DESIGN.md for the contract.
"""

from __future__ import annotations

from .asgi import ImageGuardMiddleware as ImageGuardMiddleware
from .config import Settings as Settings
from .errors import ConfigError as ConfigError
from .errors import ImageGuardError as ImageGuardError
from .errors import Rejected as Rejected
from .wsgi import ImageGuard as ImageGuard

__version__ = "0.1.0.dev0"

__all__ = [
    "ConfigError",
    "ImageGuard",
    "ImageGuardError",
    "ImageGuardMiddleware",
    "Rejected",
    "Settings",
    "__version__",
]
