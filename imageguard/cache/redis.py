"""L3: Redis, shared by every instance, and the purge bus between instances.

Use it when several processes or machines serve the same images
(``IMAGEGUARD_REDIS_URL``, DESIGN §7 and §12). :class:`RedisCache` is a
:class:`~imageguard.cache.RecordTier`: it stores sealed envelopes
(:mod:`imageguard.cache.envelope`) and checks each one on every read, so a
Redis that someone else can write to still cannot make imageguard serve bytes
it did not produce.

Everything lives under ``imageguard:<fingerprint>:``, the fingerprint being a
non-secret name of ``IMAGEGUARD_SECRET_KEY`` (:attr:`Sealer.fingerprint`), so
two applications with different secrets can share one Redis without seeing
each other's entries or purges::

    imageguard:<fp>:e:<key>            the sealed entry (SET ... EX ttl)
    imageguard:<fp>:s:<source hash>    the keys of one source's variants (a set)
    imageguard:<fp>:gen                the shared generation counter ("purge all")
    imageguard:<fp>:purge              the pub/sub channel of purge messages

Redis being down or slow never fails a request: every call goes through a
:class:`CircuitBreaker`, timeouts are short (0.25 s unless the URL says
otherwise) and redis-py's retries are off, so an outage costs one short
timeout per breaker interval, not one per request; meanwhile reads are misses
and stores are skipped, and the tier comes back by itself.

Purges reach the other instances as :class:`PurgeMessage` objects on the
channel, authenticated with :meth:`Sealer.sign_message`. A listener thread
(:meth:`RedisCache.start_listener`) hands them to ``on_purge``, and after every
(re)subscription calls ``on_resync`` with the current generation, so an
instance that was cut off catches up on the "purge all" it may have missed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast, get_args

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..config import redact_url
from ..events import logger, security_event
from .envelope import IntegrityError, Record, Sealer

#: Default seconds to connect to Redis and to wait for an answer (the URL's
#: ``?socket_timeout=`` and ``?socket_connect_timeout=`` win).
SOCKET_TIMEOUT = 0.25
#: Seconds the purge listener waits for a message before checking whether it should stop.
LISTENER_POLL = 0.5
#: Seconds between two ``on_tick`` calls (the core flushes its counters to Redis).
TICK_INTERVAL = 10.0
#: Seconds the purge listener waits for Redis to confirm its subscription.
SUBSCRIBE_TIMEOUT = 2.0
#: Seconds before the first reconnection of the purge listener (doubling up to the breaker interval).
FIRST_RECONNECT_DELAY = 0.05
#: Keys per DEL and per SCAN page (keeps each command short on a large cache).
BATCH = 500
#: Seconds between two warnings about Redis answering with an error (OOM, ACL, wrong type).
ERROR_LOG_INTERVAL = 60.0

Op = Literal["key", "source", "all"]
_OPS: frozenset[str] = frozenset(get_args(Op))

#: The errors that mean "Redis cannot be reached right now": they open the breaker.
#: (redis-py's AuthenticationError and BusyLoadingError are ConnectionErrors.)
UNREACHABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    TimeoutError,
    OSError,
)

_T = TypeVar("_T")


class _WrongType:
    """What a read answers when the key holds a list, a set...: not ours."""


_WRONG_TYPE = _WrongType()


class CircuitBreaker:
    """Stops calling a dependency that fails, and probes it again now and then.

    Closed, every caller is allowed. The first :meth:`failure` opens it (one
    warning); while open, :meth:`allow` answers ``False`` until *interval*
    seconds have passed since the last failure, then ``True`` to exactly one
    caller, the probe, whose :meth:`success` closes it again (one info
    message) and whose :meth:`failure` re-opens it for another interval.
    Thread-safe.

    :param name: what is guarded, as the log messages name it.
    :param interval: seconds between two probes while open.
    :param clock: the clock, injectable for tests.
    """

    def __init__(
        self, name: str, interval: float = 5.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._open = False
        self._probing = False  # a probe was let through and has not reported yet
        self._since = 0.0  # the last failure, or the start of the running probe
        #: Failures recorded (each one is a call that reached for the dependency and failed).
        self.failures = 0
        #: Closed → open transitions (each logged once).
        self.trips = 0

    @property
    def is_open(self) -> bool:
        """Whether the dependency is considered down."""
        return self._open

    def allow(self) -> bool:
        """Whether the caller may call the dependency now."""
        with self._lock:
            if not self._open:
                return True
            # A probe that never reported (its caller died) is replaced after one interval.
            if self._clock() - self._since < self.interval:
                return False
            self._since = self._clock()  # the next probe, one interval from now
            self._probing = True
            return True

    def success(self) -> None:
        """The dependency answered: close (unless it opened meanwhile and no probe was let through).

        A call that started before an outage and answers just after another
        call failed is stale news: only the probe's answer may close the breaker.
        """
        with self._lock:
            if self._open and not self._probing:
                return
            was_open, self._open, self._probing = self._open, False, False
        if was_open:
            logger.info("%s is back", self.name)

    def failure(self, error: BaseException) -> None:
        """The dependency failed with *error*: open (or stay open) for another interval."""
        with self._lock:
            self.failures += 1
            tripped = not self._open
            self._open, self._since, self._probing = True, self._clock(), False
            if tripped:
                self.trips += 1
        if tripped:
            logger.warning(
                "%s is unavailable (%s: %s); carrying on without it, next try in %gs",
                self.name,
                type(error).__name__,
                error,
                self.interval,
            )

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at fork time


@dataclass(frozen=True)
class PurgeMessage:
    """One purge, broadcast to the other instances on the Redis channel.

    :param op: ``key`` (one variant), ``source`` (every variant of a source) or ``all``.
    :param value: the cache key, the source hash, or ``""`` for ``all``.
    :param generation: the generation after the purge (meaningful for ``all``).
    :param origin: the sending instance (:attr:`RedisCache.origin`); an instance
        ignores its own messages. :meth:`RedisCache.publish` fills it in.
    """

    op: Op
    value: str
    generation: int
    origin: str = ""

    def to_json(self) -> bytes:
        """The message as compact JSON (what is signed and sent)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> PurgeMessage:
        """Parse :meth:`to_json` output.

        :raises ValueError: not a purge message.
        """
        fields = json.loads(payload)
        if not isinstance(fields, dict):
            raise ValueError("not an object")
        op, value, generation, origin = (fields.get(k) for k in ("op", "value", "generation", "origin"))
        if op not in _OPS or not isinstance(value, str) or not isinstance(origin, str):
            raise ValueError("bad op, value or origin")
        if not isinstance(generation, int) or isinstance(generation, bool):
            raise ValueError("bad generation")
        return cls(op=cast(Op, op), value=value, generation=generation, origin=origin)


def connect(url: str, **options: Any) -> redis.Redis:
    """A client for *url* that fails fast: short timeouts, no retries.

    Nothing is connected yet (redis-py connects on the first command). The
    URL's query parameters (``?socket_timeout=0.5``) win over these defaults
    and over *options*: redis-py's ``from_url`` applies them last.
    """
    defaults: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
        # One attempt per call: the breaker decides when to try again.
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        **options,
    }
    return redis.Redis.from_url(url, **defaults)


class RedisCache:
    """The L3 tier (a :class:`~imageguard.cache.RecordTier`) and the purge bus.

    Nothing connects in the constructor: Redis may be down when the
    application starts, and the tier comes up with it.

    :param url: ``redis://``, ``rediss://`` or ``unix://`` URL (``IMAGEGUARD_REDIS_URL``).
    :param ttl: seconds an entry lives in Redis (``IMAGEGUARD_CACHE_TTL``); at least 1.
    :param sealer: seals and opens entries; its fingerprint names the namespace.
    :param on_purge: called, from the listener thread, with each authenticated
        purge message sent by another instance.
    :param on_resync: called, from the listener thread, with the current
        generation after each successful (re)subscription.
    :param breaker_interval: seconds between two attempts while Redis is down.
    :param clock: the breaker's clock, injectable for tests (monotonic by default).
    :raises ValueError: *ttl* below 1 or a malformed *url*.
    """

    name = "l3"

    def __init__(
        self,
        url: str,
        ttl: int,
        sealer: Sealer,
        *,
        on_purge: Callable[[PurgeMessage], None] | None = None,
        on_resync: Callable[[int], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        breaker_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 1:
            raise ValueError(f"Redis TTL must be at least 1 second, not {ttl!r}")
        self.url = redact_url(url)
        self.ttl = int(ttl)
        self.on_purge = on_purge
        self.on_resync = on_resync
        #: Called from the listener thread about every :data:`TICK_INTERVAL` seconds
        #: while Redis is reachable (the core flushes its counters there).
        self.on_tick = on_tick
        self._last_tick = time.monotonic()
        self._sealer = sealer
        self._clock = clock
        #: Where every key of this secret lives (the fingerprint is hex: no glob characters).
        self.namespace = f"imageguard:{sealer.fingerprint}:"
        #: The pub/sub channel of purge messages.
        self.channel = self.namespace + "purge"
        #: This instance, in the purge messages it sends.
        self.origin = secrets.token_hex(8)
        self._entries = (self.namespace + "e:").encode()
        self._sources = (self.namespace + "s:").encode()
        self._generation = (self.namespace + "gen").encode()
        self._counters = (self.namespace + "counters").encode()
        #: Guards every call to Redis (the listener's too).
        self.breaker = CircuitBreaker(f"Redis (L3) at {self.url}", breaker_interval, clock=clock)
        self._client = connect(url)
        # The listener's own pool: its subscribed connection is held for good.
        self._listener_client = connect(url, health_check_interval=max(1, int(breaker_interval)))
        self._counters_lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.integrity_failures = 0
        self.errors = 0
        self._last_error_log: float | None = None
        self._closed = False
        self._listener_lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._listener_pid: int | None = None
        self._stop = threading.Event()
        _INSTANCES.add(self)

    # -- RecordTier -----------------------------------------------------------------

    def get(self, key: str, source_hash: str) -> Record | None:
        name = self._entries + _encode(key)

        def fetch(client: redis.Redis) -> bytes | _WrongType | None:
            try:
                return cast("bytes | None", client.get(name))
            except redis.exceptions.ResponseError as exc:
                if str(exc).startswith("WRONGTYPE"):
                    return _WRONG_TYPE
                raise

        data = self._run(fetch, None)
        if data is None:
            self._count("misses")
            return None
        try:
            if isinstance(data, _WrongType):
                raise IntegrityError("wrong_type")
            record = self._sealer.open(key, data)
            if record.source_hash != source_hash:
                raise IntegrityError("wrong_source")
        except IntegrityError as exc:
            self._reject(key, name, exc.detail)
            return None
        self._count("hits")
        return record

    def set(self, record: Record) -> None:
        def store(client: redis.Redis) -> None:
            index = self._sources + record.source_hash.encode()
            pipe = client.pipeline(transaction=True)
            pipe.set(self._entries + _encode(record.key), self._sealer.seal(record), ex=self.ttl)
            pipe.sadd(index, _encode(record.key))
            pipe.expire(index, self.ttl)  # the index lives as long as its newest variant
            pipe.execute()

        self._run(store, None)

    def delete(self, key: str) -> bool:
        name = self._entries + _encode(key)
        return self._run(lambda client: bool(client.delete(name)), False)

    def delete_source(self, source_hash: str) -> int:
        index = self._sources + source_hash.encode()

        def purge(client: redis.Redis) -> int:
            # Read and drop the index at once: a variant stored meanwhile starts a new index.
            pipe = client.pipeline(transaction=True)
            pipe.smembers(index)
            pipe.delete(index)
            members, _ = pipe.execute()
            names = [self._entries + bytes(member) for member in members]
            return sum(int(client.delete(*batch)) for batch in _batches(names))

        return self._run(purge, 0)

    def clear(self) -> None:
        """Remove every entry and index of this namespace (the generation counter stays)."""

        def wipe(client: redis.Redis) -> None:
            for prefix in (self._entries, self._sources):
                names: list[bytes] = []
                for name in client.scan_iter(match=prefix + b"*", count=BATCH):
                    names.append(name)
                    if len(names) >= BATCH:
                        client.delete(*names)
                        names = []
                if names:
                    client.delete(*names)

        self._run(wipe, None)

    def stats(self) -> dict[str, Any]:
        """Counters of this instance, and what Redis says about itself.

        ``bytes`` is Redis's ``used_memory`` (also given as ``redis_used_memory``:
        it covers the whole server, not only this namespace; summing the
        entries' lengths would take one command per entry) and ``maxbytes`` its
        ``maxmemory`` (0: no limit). Both are 0, like ``entries``, when Redis
        cannot be reached (``available`` is then ``False``).
        """

        def count(client: redis.Redis) -> int:
            return sum(1 for _ in client.scan_iter(match=self._entries + b"*", count=BATCH))

        entries = self._run(count, 0)
        empty: dict[str, Any] = {}
        memory = self._run(lambda client: dict(client.info("memory")), empty)
        used = int(memory.get("used_memory", 0))
        with self._counters_lock:
            counters = {
                "hits": self.hits,
                "misses": self.misses,
                "integrity_failures": self.integrity_failures,
                "errors": self.errors,
            }
        return {
            "entries": entries,
            "bytes": used,
            "redis_used_memory": used,
            "maxbytes": int(memory.get("maxmemory", 0)),
            **counters,
            "available": not self.breaker.is_open,
            "url": self.url,
            "namespace": self.namespace,
            "ttl": self.ttl,
        }

    def verify(self) -> Iterator[tuple[str, str | None]]:
        """Walk every entry of the namespace: ``(key, None)`` if sound, ``(key, detail)`` if not.

        Nothing is deleted. The walk stops early if Redis becomes unreachable
        (check :attr:`available` afterwards).
        """
        cursor = 0
        match = self._entries + b"*"
        while True:
            page = self._run(functools.partial(_scan_page, cursor=cursor, match=match), None)
            if page is None:
                return
            cursor, names = page
            values = self._run(functools.partial(_fetch_many, names=names), None) if names else []
            if values is None:
                return
            for name, value in zip(names, values, strict=True):
                key = name[len(self._entries) :].decode("utf-8", "backslashreplace")
                if value is None:
                    continue  # expired or deleted since the SCAN
                if isinstance(value, redis.exceptions.ResponseError):
                    yield key, "wrong_type"
                    continue
                if not isinstance(value, bytes):
                    yield key, "unreadable"
                    continue
                try:
                    self._sealer.open(key, value)
                except IntegrityError as exc:
                    yield key, exc.detail
                else:
                    yield key, None
            if cursor == 0:
                return

    def close(self) -> None:
        """Stop the listener (waiting at most 2 s) and close the connections."""
        self._closed = True
        self._stop.set()
        thread = self._listener
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            thread.join(2.0)
        for client in (self._client, self._listener_client):
            with contextlib.suppress(Exception):  # closing is best effort
                client.close()

    # -- generation and purge bus -----------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether Redis is considered reachable (the breaker is closed)."""
        return not self.breaker.is_open

    def generation(self) -> int | None:
        """The shared generation counter (0 if never bumped), or ``None`` if Redis is unreachable."""
        return self._run(functools.partial(_read_counter, name=self._generation), None)

    def bump_generation(self) -> int | None:
        """Increment the shared generation counter: the new value, or ``None`` if Redis is unreachable."""
        return self._run(lambda client: int(client.incr(self._generation)), None)

    def add_counters(self, deltas: dict[str, int]) -> bool:
        """Add *deltas* to the fleet-wide counters (one ``HINCRBY`` each, pipelined); whether it worked."""

        def add(client: redis.Redis) -> bool:
            pipe = client.pipeline(transaction=False)
            for name, delta in deltas.items():
                pipe.hincrby(self._counters, name, delta)
            pipe.execute()
            return True

        return bool(deltas) and self._run(add, False)

    def counters(self) -> dict[str, int]:
        """The fleet-wide counters every instance adds to (empty if Redis is unreachable)."""

        def read(client: redis.Redis) -> dict[str, int]:
            raw = cast("dict[bytes, bytes]", client.hgetall(self._counters))
            return {k.decode(): int(v) for k, v in raw.items()}

        return self._run(read, {})

    def publish(self, message: PurgeMessage) -> None:
        """Send *message* to the other instances, signed, with :attr:`origin` filled in (best effort)."""
        signed = self._sealer.sign_message(dataclasses.replace(message, origin=self.origin).to_json())
        self._run(lambda client: client.publish(self.channel, signed), None)

    def start_listener(self) -> None:
        """Start the thread that receives purge messages, unless it runs already.

        Call it again in a forked child (gunicorn with ``preload_app``): threads
        do not survive ``fork()``, and the listener is restarted there.
        """
        with self._listener_lock:
            if self._closed:
                return
            alive = self._listener is not None and self._listener.is_alive()
            if alive and self._listener_pid == os.getpid():
                return
            self._stop = threading.Event()
            self._listener_pid = os.getpid()
            self._listener = threading.Thread(
                target=_listen,
                args=(weakref.ref(self), self._stop),
                name="imageguard-l3-purge",
                daemon=True,
            )
            self._listener.start()

    @property
    def listening(self) -> bool:
        """Whether the listener thread runs in this process."""
        thread = self._listener
        return thread is not None and thread.is_alive() and self._listener_pid == os.getpid()

    # -- internals ------------------------------------------------------------------

    def _run(self, operation: Callable[[redis.Redis], _T], default: _T) -> _T:
        """*operation*'s result, or *default* if the breaker is open or Redis fails."""
        if self._closed or not self.breaker.allow():
            return default
        try:
            result = operation(self._client)
        except UNREACHABLE as exc:
            self.breaker.failure(exc)
            return default
        except redis.exceptions.RedisError as exc:
            self.breaker.success()  # it answered, with an error (OOM, ACL, wrong type)
            self._error(exc)
            return default
        except Exception:  # a cache tier never fails a request
            logger.exception("unexpected error in the Redis (L3) cache tier")
            self._count("errors")
            return default
        self.breaker.success()
        return result

    def _reject(self, key: str, name: bytes, detail: str) -> None:
        self._run(lambda client: client.delete(name), None)
        with self._counters_lock:
            self.integrity_failures += 1
            self.misses += 1
        security_event(
            "integrity_failure",
            "a Redis cache entry failed its integrity check",
            tier="l3",
            key=key[:12],
            detail=detail,
        )

    def _count(self, counter: str) -> None:
        with self._counters_lock:
            setattr(self, counter, getattr(self, counter) + 1)

    def _error(self, error: BaseException) -> None:
        now = self._clock()
        with self._counters_lock:
            self.errors += 1
            quiet = self._last_error_log is not None and now - self._last_error_log < ERROR_LOG_INTERVAL
            if not quiet:
                self._last_error_log = now
        if not quiet:
            logger.warning("Redis (L3) at %s answered with an error: %s", self.url, error)

    def _receive(self, message: dict[str, Any]) -> None:
        data = message.get("data")
        if message.get("type") != "message" or not isinstance(data, bytes):
            return
        payload = self._sealer.open_message(data)
        if payload is None:
            security_event(
                "forged_purge_message",
                "a purge message on Redis failed its authentication",
                tier="l3",
                size=len(data),
            )
            return
        try:
            purge = PurgeMessage.from_json(payload)
        except ValueError as exc:  # authentic, so another version of imageguard: not an attack
            logger.warning("ignored a purge message imageguard cannot read (%s)", exc)
            return
        if purge.origin != self.origin:
            self._notify(self.on_purge, purge)

    def _notify(self, callback: Callable[[_T], None] | None, argument: _T) -> None:
        if callback is None:
            return
        try:
            callback(argument)
        except Exception:
            logger.exception("a Redis (L3) purge callback failed")

    def _after_fork_in_child(self) -> None:
        # The listener thread did not survive fork(); start_listener() starts a new one.
        if self._listener_pid == os.getpid():
            return  # already restarted by an earlier at-fork hook (the core's)
        self._listener = None
        self._listener_pid = None
        self._stop = threading.Event()
        self._listener_lock = threading.Lock()
        self._counters_lock = threading.Lock()
        self.breaker._after_fork_in_child()


def _read_counter(client: redis.Redis, *, name: bytes) -> int:
    value = client.get(name)
    if value is None:
        return 0
    try:
        return int(cast("bytes", value))
    except ValueError:
        raise redis.exceptions.DataError("the generation counter is not an integer") from None


def _listen(ref: weakref.ReferenceType[RedisCache], stop: threading.Event) -> None:
    """The purge listener thread: subscribe, hand messages over, reconnect with backoff.

    It holds the cache weakly, and strongly only while handing a message
    over: a cache that nobody closed and nobody uses any more is collected,
    and the thread ends instead of keeping it (and its core) alive.
    """
    delay = FIRST_RECONNECT_DELAY
    while not stop.is_set():
        cache = ref()
        if cache is None:
            return
        breaker, client, channel, counter = (
            cache.breaker,
            cache._listener_client,
            cache.channel,
            cache._generation,
        )
        del cache
        if breaker.allow():
            pubsub = client.pubsub()
            try:
                if not _subscribe(pubsub, channel, stop):
                    return  # stopped while subscribing
                generation = _read_counter(client, name=counter)
                breaker.success()
                delay = FIRST_RECONNECT_DELAY
                if not _hand_over(ref, "resync", generation):
                    return
                while not stop.is_set():
                    message = pubsub.get_message(ignore_subscribe_messages=True, timeout=LISTENER_POLL)
                    if not _hand_over(ref, "message", message) or not _hand_over(ref, "tick", None):
                        return
            except UNREACHABLE as exc:
                breaker.failure(exc)
            except redis.exceptions.RedisError as exc:
                breaker.success()  # it answered, with an error (ACL, a garbled counter)
                _hand_over(ref, "error", exc)
            except Exception:
                logger.exception("the Redis (L3) purge listener failed; restarting it")
            finally:
                with contextlib.suppress(Exception):  # the connection may be gone already
                    pubsub.close()
        stop.wait(delay)
        delay = min(delay * 2, max(breaker.interval, FIRST_RECONNECT_DELAY))


def _subscribe(pubsub: redis.client.PubSub, channel: str, stop: threading.Event) -> bool:
    """Subscribe and wait for Redis to confirm; ``False`` if stopped meanwhile.

    The listener reads the generation after the confirmation: in this order, a
    purge is either in that read or delivered on the channel afterwards, never
    lost in between.
    """
    pubsub.subscribe(channel)
    deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
    while not stop.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise redis.exceptions.TimeoutError("Redis did not confirm the subscription")
        reply = pubsub.get_message(timeout=min(remaining, LISTENER_POLL))
        if reply is not None and reply.get("type") == "subscribe":
            return True
    return False


def _hand_over(ref: weakref.ReferenceType[RedisCache], kind: str, item: Any) -> bool:
    """Give *item* to the cache; ``False`` if the cache is gone."""
    cache = ref()
    if cache is None:
        return False
    if kind == "resync":
        cache._notify(cache.on_resync, item)
    elif kind == "tick":
        now = time.monotonic()
        if cache.on_tick is not None and now - cache._last_tick >= TICK_INTERVAL:
            cache._last_tick = now
            cache._notify(lambda _: cache.on_tick() if cache.on_tick else None, None)
    elif kind == "error":
        cache._error(item)
    elif item is not None:
        cache._receive(item)
    return True


def _encode(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


def _batches(names: Sequence[bytes]) -> Iterator[Sequence[bytes]]:
    for start in range(0, len(names), BATCH):
        yield names[start : start + BATCH]


def _scan_page(client: redis.Redis, *, cursor: int, match: bytes) -> tuple[int, list[bytes]]:
    return cast("tuple[int, list[bytes]]", client.scan(cursor, match=match, count=BATCH))


def _fetch_many(client: redis.Redis, *, names: Sequence[bytes]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.get(name)
    # A key holding a list or a set answers WRONGTYPE: reported, not raised.
    return pipe.execute(raise_on_error=False)


_INSTANCES: weakref.WeakSet[RedisCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_INSTANCES):
        cache._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
