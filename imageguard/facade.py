"""What both adapters offer the application: signed URLs, purges, stats, start-up warnings."""

from __future__ import annotations

from .config import Settings
from .core import Core
from .events import logger


class GuardFacade:
    """The public helpers of :class:`~imageguard.ImageGuard` and
    :class:`~imageguard.ImageGuardMiddleware`; they delegate to the core."""

    core: Core | None

    def _core(self) -> Core:
        if self.core is None:
            raise RuntimeError("imageguard has no app yet: call init_app(app) first")
        return self.core

    def url(self, path: str | None = None, /, *, remote: str | None = None, **params: object) -> str:
        """A signed URL for *path*: ``guard.url("/static/cat.jpg", w=320, fmt="webp")``, or
        for a remote image: ``guard.url(remote="https://img.example.com/a.png", w=64)``.

        :raises ValueError: a parameter, path or remote URL the middleware would refuse.
        """
        return self._core().url(path, remote=remote, **params)

    def purge(self, *, key: str | None = None, path: str | None = None, remote: str | None = None) -> int:
        """Drop one entry (*key*) or every variant of a source (*path* or *remote* URL); how many went."""
        return self._core().purge(key=key, path=path, remote=remote)

    def purge_all(self) -> None:
        """Drop everything: no entry cached before the call can be served after it."""
        self._core().purge_all()

    def stats(self) -> dict[str, object]:
        """Cache counters per tier."""
        return self._core().stats()

    def close_tiers(self) -> None:
        """Close the disk and Redis tiers (files, connections, the purge listener)."""
        if self.core is not None:
            self.core.close()


_warned: set[str] = set()


def warn_about(settings: Settings) -> None:
    """Start-up warnings for settings that weaken the guarantees (once per process)."""
    if settings.ephemeral_key and "ephemeral" not in _warned:
        _warned.add("ephemeral")
        logger.warning(
            "IMAGEGUARD_SECRET_KEY is not set: using an ephemeral key. Signed URLs will not "
            "survive a restart or work across processes; run `imageguard keygen`."
        )
    shared_tiers = settings.disk_cache_dir is not None or settings.redis_url is not None
    if settings.ephemeral_key and shared_tiers and "ephemeral-tiers" not in _warned:
        _warned.add("ephemeral-tiers")
        logger.warning(
            "IMAGEGUARD_DISK_CACHE_DIR/IMAGEGUARD_REDIS_URL with an ephemeral key: entries are "
            "sealed with a key that dies with this process, so no other process (and no "
            "restart) can use them. Set IMAGEGUARD_SECRET_KEY to the same key everywhere."
        )
    if settings.signing == "off" and "signing-off" not in _warned:
        _warned.add("signing-off")
        logger.warning(
            "IMAGEGUARD_SIGNING=off: transform parameters are not signed, so clients can "
            "make the cache hold any number of variants."
        )
