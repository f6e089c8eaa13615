"""Tests for imageguard.config: Settings, Settings.from_env and parse_size."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import pytest

from imageguard.config import ENV_PREFIX, VARIABLES, Settings, parse_size
from imageguard.errors import ConfigError

KEY = "test-key-0123456789abcdef"
OLD_KEY = "old-key-0123456789abcdef"
MiB = 1024 * 1024


def env(**variables: str) -> dict[str, str]:
    """``env(MAX_BYTES="1MiB")`` → ``{"IMAGEGUARD_MAX_BYTES": "1MiB"}``."""
    return {ENV_PREFIX + name: value for name, value in variables.items()}


def error_chain(exc: BaseException) -> str:
    """Everything a traceback of *exc* would print about the errors in its chain."""
    text = []
    current: BaseException | None = exc
    while current is not None:
        text.append(f"{current!r} {current}")
        current = current.__cause__ or current.__context__
    return "\n".join(text)


# -- variables -----------------------------------------------------------------------


def test_variables_map_every_field_to_its_environment_variable() -> None:
    assert ENV_PREFIX == "IMAGEGUARD_"
    assert VARIABLES["max_pixels"] == "IMAGEGUARD_MAX_PIXELS"
    assert VARIABLES["secret_key"] == "IMAGEGUARD_SECRET_KEY"
    assert "ephemeral_key" not in VARIABLES
    assert set(VARIABLES) == {f.name for f in dataclasses.fields(Settings) if f.init}
    # DESIGN §10 (26) + CORP, SVG_DATA_IMAGES, SURROGATE_KEY + five REMOTE_* (issue 8)
    assert len(VARIABLES) == 34


# -- defaults (DESIGN §10) -----------------------------------------------------------

DEFAULTS: list[tuple[str, object]] = [
    ("paths", ("/",)),
    ("formats", frozenset({"jpeg", "png", "gif", "webp", "avif", "svg"})),
    ("signing", "transforms"),
    ("signature_max_age", None),
    ("source_params", ()),
    ("key_hosts", ()),
    ("max_bytes", 20 * MiB),
    ("max_pixels", 50_000_000),
    ("max_side", 16384),
    ("max_frames", 200),
    ("svg", "sanitize"),
    ("max_svg_bytes", 2 * MiB),
    ("svg_max_nodes", 20_000),
    ("svg_data_images", True),
    ("negotiate", False),
    ("cache_bytes", 64 * MiB),
    ("cache_ttl", 3600),
    ("disk_cache_dir", None),
    ("disk_cache_bytes", 1024 * MiB),
    ("redis_url", None),
    ("cache_control", "public, max-age=86400"),
    ("miss_rate", "120/minute"),
    ("trusted_proxies", 0),
    ("queue", 64),
    ("log_format", "text"),
    ("cross_origin_resource_policy", "same-site"),
    ("surrogate_key", "off"),
    ("remote_path", "/_imageguard/remote"),
    ("remote_hosts", ()),
    ("remote_schemes", frozenset({"https"})),
    ("remote_allow_private", False),
    ("remote_timeout", 20),
]


@pytest.mark.parametrize(("name", "expected"), DEFAULTS, ids=[name for name, _ in DEFAULTS])
def test_default(name: str, expected: object) -> None:
    assert getattr(Settings(), name) == expected
    assert getattr(Settings.from_env({}), name) == expected


def test_defaults_table_covers_every_field() -> None:
    # secret_key and workers are computed; they have tests of their own.
    assert {name for name, _ in DEFAULTS} | {"secret_key", "workers"} == set(VARIABLES)


@pytest.mark.parametrize(("cpu_count", "expected"), [(12, 12), (None, 1)], ids=["cpus", "unknown"])
def test_default_workers_is_the_cpu_count(
    monkeypatch: pytest.MonkeyPatch, cpu_count: int | None, expected: int
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cpu_count)
    assert Settings().workers == expected


# -- every variable from a dict environ ----------------------------------------------

PARSED: list[Any] = [
    pytest.param("PATHS", " /static , /media/ ", ("/static", "/media/"), id="paths"),
    pytest.param("PATHS", "/a,/a,", ("/a",), id="paths-dedup"),
    pytest.param("FORMATS", "JPG, png", frozenset({"jpeg", "png"}), id="formats-alias"),
    pytest.param("FORMATS", "svg", frozenset({"svg"}), id="formats-one"),
    pytest.param("SECRET_KEY", KEY, (KEY,), id="secret_key"),
    pytest.param("SIGNING", "ALWAYS", "always", id="signing-always"),
    pytest.param("SIGNING", "off", "off", id="signing-off"),
    pytest.param("SIGNATURE_MAX_AGE", "3600", 3600, id="signature_max_age"),
    pytest.param("SIGNATURE_MAX_AGE", "off", None, id="signature_max_age-off"),
    pytest.param("SOURCE_PARAMS", "v, version_id,a.b-c", ("v", "version_id", "a.b-c"), id="source"),
    pytest.param(
        "KEY_HOSTS",
        "Example.COM, cdn.example.com:8443, [::1]:8080, 127.0.0.1",
        ("example.com", "cdn.example.com:8443", "[::1]:8080", "127.0.0.1"),
        id="key_hosts",
    ),
    pytest.param("MAX_BYTES", "5MiB", 5 * MiB, id="max_bytes"),
    pytest.param("MAX_PIXELS", "50_000_000", 50_000_000, id="max_pixels-underscores"),
    pytest.param("MAX_PIXELS", "1000", 1000, id="max_pixels"),
    pytest.param("MAX_SIDE", "4096", 4096, id="max_side"),
    pytest.param("MAX_FRAMES", " 10 ", 10, id="max_frames"),
    pytest.param("SVG", "Reject", "reject", id="svg"),
    pytest.param("MAX_SVG_BYTES", "512 KiB", 512 * 1024, id="max_svg_bytes"),
    pytest.param("SVG_MAX_NODES", "500", 500, id="svg_max_nodes"),
    pytest.param("SVG_DATA_IMAGES", "off", False, id="svg_data_images"),
    *[
        pytest.param("NEGOTIATE", text, text.lower() in {"true", "1", "yes", "on"}, id=f"bool-{text}")
        for text in ["true", "TRUE", "1", "yes", "on", "false", "0", "No", "off"]
    ],
    pytest.param("CACHE_BYTES", "0", 0, id="cache_bytes-disabled"),
    pytest.param("CACHE_BYTES", "128MB", 128_000_000, id="cache_bytes"),
    pytest.param("CACHE_TTL", "60", 60, id="cache_ttl"),
    pytest.param("DISK_CACHE_DIR", "/var/cache/imageguard", "/var/cache/imageguard", id="disk-abs"),
    pytest.param("DISK_CACHE_DIR", "cache/images", "cache/images", id="disk-relative"),
    pytest.param("DISK_CACHE_DIR", "off", None, id="disk-off"),
    pytest.param("DISK_CACHE_BYTES", "10GB", 10 * 10**9, id="disk_cache_bytes"),
    pytest.param("REDIS_URL", "redis://localhost:6379/0", "redis://localhost:6379/0", id="redis"),
    pytest.param("REDIS_URL", "rediss://u:pw@r.example:6380", "rediss://u:pw@r.example:6380", id="rediss"),
    pytest.param("REDIS_URL", "unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1", id="unix"),
    pytest.param("REDIS_URL", "off", None, id="redis-off"),
    pytest.param("CACHE_CONTROL", "public, max-age=60, immutable", "public, max-age=60, immutable", id="cc"),
    pytest.param("MISS_RATE", "10 per second", "10 per second", id="miss_rate-per"),
    pytest.param("MISS_RATE", "100/2 hours", "100/2 hours", id="miss_rate-multiple"),
    pytest.param("MISS_RATE", "5/day;100/month", "5/day;100/month", id="miss_rate-many"),
    pytest.param("MISS_RATE", "OFF", None, id="miss_rate-off"),
    pytest.param("TRUSTED_PROXIES", "2", 2, id="trusted_proxies"),
    pytest.param("WORKERS", "8", 8, id="workers"),
    pytest.param("QUEUE", "0", 0, id="queue"),
    pytest.param("LOG_FORMAT", "json", "json", id="log_format"),
    pytest.param("CROSS_ORIGIN_RESOURCE_POLICY", "cross-origin", "cross-origin", id="corp"),
    pytest.param("CROSS_ORIGIN_RESOURCE_POLICY", "off", "off", id="corp-off"),
    pytest.param("SURROGATE_KEY", "Cache-Tag", "cache-tag", id="surrogate-key"),
    pytest.param("REMOTE_PATH", "/img/proxy", "/img/proxy", id="remote-path"),
    pytest.param(
        "REMOTE_HOSTS", "*.Example.com, cdn.example.org.", ("*.example.com", "cdn.example.org"), id="hosts"
    ),
    pytest.param("REMOTE_SCHEMES", "https,http", frozenset({"http", "https"}), id="remote-schemes"),
    pytest.param("REMOTE_ALLOW_PRIVATE", "yes", True, id="remote-allow-private"),
    pytest.param("REMOTE_TIMEOUT", "5", 5, id="remote-timeout"),
]


@pytest.mark.parametrize(("name", "value", "expected"), PARSED)
def test_variable_is_parsed_from_environ(name: str, value: str, expected: object) -> None:
    settings = Settings.from_env(env(**{name: value}))
    assert getattr(settings, name.lower()) == expected
    # The constructor takes the same strings.
    assert getattr(Settings(**{name.lower(): value}), name.lower()) == expected


def test_parsed_table_covers_every_variable() -> None:
    assert {ENV_PREFIX + param.values[0] for param in PARSED} == set(VARIABLES.values())


TYPED: list[Any] = [
    pytest.param("paths", ["/a", "/b"], ("/a", "/b"), id="paths-list"),
    pytest.param("formats", {"jpg", "PNG"}, frozenset({"jpeg", "png"}), id="formats-set"),
    pytest.param(
        "secret_key",
        [b"bytes-key-0123456789", "str,key-0123456789"],
        ("bytes-key-0123456789", "str,key-0123456789"),
        id="keys-sequence",
    ),
    pytest.param("secret_key", b"bytes-key-0123456789", ("bytes-key-0123456789",), id="key-bytes"),
    pytest.param("signature_max_age", None, None, id="max_age-none"),
    pytest.param("max_bytes", 1024, 1024, id="size-int"),
    pytest.param("max_pixels", 10, 10, id="int"),
    pytest.param("negotiate", True, True, id="bool"),
    pytest.param("disk_cache_dir", pathlib.Path("/srv/cache"), "/srv/cache", id="pathlike"),
    pytest.param("miss_rate", None, None, id="miss_rate-none"),
]


@pytest.mark.parametrize(("name", "value", "expected"), TYPED)
def test_typed_arguments_are_normalised(name: str, value: Any, expected: object) -> None:
    assert getattr(Settings(**{name: value}), name) == expected


# -- overrides, empty values, unknown variables --------------------------------------

OVERRIDES: list[Any] = [
    pytest.param(env(MAX_BYTES="1MiB"), {"max_bytes": "2MiB"}, "max_bytes", 2 * MiB, id="string"),
    pytest.param(env(NEGOTIATE="yes"), {"negotiate": False}, "negotiate", False, id="typed"),
    pytest.param(env(REDIS_URL="redis://r:6379"), {"redis_url": None}, "redis_url", None, id="none"),
    pytest.param(env(MAX_SIDE="bogus"), {"max_side": 10}, "max_side", 10, id="bad-env-unused"),
    pytest.param(env(SECRET_KEY=OLD_KEY), {"secret_key": KEY}, "secret_key", (KEY,), id="key"),
]


@pytest.mark.parametrize(("environ", "overrides", "name", "expected"), OVERRIDES)
def test_explicit_overrides_beat_the_environment(
    environ: dict[str, str], overrides: dict[str, object], name: str, expected: object
) -> None:
    assert getattr(Settings.from_env(environ, **overrides), name) == expected


def test_other_variables_in_the_environment_are_kept() -> None:
    settings = Settings.from_env(env(MAX_SIDE="100", QUEUE="5"), queue=6)
    assert (settings.max_side, settings.queue) == (100, 6)


@pytest.mark.parametrize("value", ["", "   "], ids=["empty", "blank"])
def test_empty_variable_means_default(value: str) -> None:
    environ = {variable: value for variable in VARIABLES.values()}
    settings = Settings.from_env(environ)
    for name, expected in DEFAULTS:
        assert getattr(settings, name) == expected, name
    assert settings.ephemeral_key


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in list(os.environ):
        if variable.startswith(ENV_PREFIX):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("IMAGEGUARD_MAX_SIDE", "100")
    assert Settings.from_env().max_side == 100
    assert Settings().max_side == 16384  # the constructor never reads the environment


def test_unknown_imageguard_variable_raises() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"IMAGEGUARD_MAX_BYTE": "secret-looking-value"})
    assert info.value.variable == "IMAGEGUARD_MAX_BYTE"
    assert "IMAGEGUARD_MAX_BYTE=" in str(info.value)
    assert "IMAGEGUARD_MAX_BYTES" in info.value.accepted  # the known variables are listed
    assert "secret-looking-value" not in str(info.value)  # could be a misspelt key


def test_variables_without_the_prefix_are_ignored() -> None:
    settings = Settings.from_env({"PATH": "/usr/bin", "imageguard_paths": "x", "IMAGEGUARDPATHS": "x"})
    assert settings.paths == ("/",)


@pytest.mark.parametrize("name", ["bogus", "ephemeral_key"])
def test_unknown_keyword_raises_type_error(name: str) -> None:
    with pytest.raises(TypeError):
        Settings(**{name: True})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Settings.from_env({}, **{name: True})


# -- sizes ---------------------------------------------------------------------------

SIZES: list[Any] = [
    pytest.param("20MiB", 20 * MiB, id="MiB"),
    pytest.param("20971520", 20 * MiB, id="bytes"),
    pytest.param(20971520, 20 * MiB, id="int"),
    pytest.param("20_971_520", 20 * MiB, id="underscores"),
    pytest.param("512 KiB", 512 * 1024, id="KiB-space"),
    pytest.param("512kib", 512 * 1024, id="kib-lower"),
    pytest.param("1.5GiB", 1536 * MiB, id="fraction"),
    pytest.param("10MB", 10_000_000, id="decimal-MB"),
    pytest.param("10 mb", 10_000_000, id="decimal-lower"),
    pytest.param("2 KB", 2000, id="KB"),
    pytest.param("3GB", 3 * 10**9, id="GB"),
    pytest.param("1TiB", 1024**4, id="TiB"),
    pytest.param("1TB", 10**12, id="TB"),
    pytest.param("100B", 100, id="B"),
    pytest.param("1.1KiB", 1126, id="fraction-rounds-down"),
    pytest.param(" 7 ", 7, id="whitespace"),
    pytest.param("0", 0, id="zero"),
]


@pytest.mark.parametrize(("text", "expected"), SIZES)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


def test_size_spellings_are_equivalent() -> None:
    spellings: list[str | int] = ["20MiB", "20971520", 20971520, "20 mib", "20_971_520"]
    assert {Settings(secret_key=KEY, max_bytes=size) for size in spellings} == {
        Settings(secret_key=KEY, max_bytes=20 * MiB)
    }


@pytest.mark.parametrize(
    "text",
    ["", "MiB", "1.5", "20 XB", "20M", "-1", -1, "1e6", "1,000", "20 MiB B", True, 1.5, None],
    ids=repr,
)
def test_parse_size_rejects(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


# -- bad values: one table row (at least) per variable -------------------------------

BAD: list[Any] = [
    pytest.param("PATHS", "static", id="paths-relative"),
    pytest.param("PATHS", "/a/../b", id="paths-dotdot"),
    pytest.param("PATHS", "/a\\b", id="paths-backslash"),
    pytest.param("PATHS", "/a?x=1", id="paths-query"),
    pytest.param("PATHS", "/a#x", id="paths-fragment"),
    pytest.param("PATHS", "/a\x00", id="paths-nul"),
    pytest.param("PATHS", ",", id="paths-none"),
    pytest.param("FORMATS", "bmp", id="formats-unknown"),
    pytest.param("FORMATS", "jpeg,tiff", id="formats-one-unknown"),
    pytest.param("FORMATS", ",", id="formats-empty"),
    pytest.param("SECRET_KEY", "short", id="key-short"),
    pytest.param("SECRET_KEY", f"{KEY},short", id="key-one-short"),
    pytest.param("SIGNING", "sometimes", id="signing"),
    pytest.param("SIGNATURE_MAX_AGE", "0", id="max_age-zero"),
    pytest.param("SIGNATURE_MAX_AGE", "1h", id="max_age-unit"),
    pytest.param("SOURCE_PARAMS", "w", id="source-reserved"),
    pytest.param("SOURCE_PARAMS", "v,S", id="source-reserved-case"),
    pytest.param("SOURCE_PARAMS", "a b", id="source-space"),
    pytest.param("SOURCE_PARAMS", "x=1", id="source-equals"),
    pytest.param("KEY_HOSTS", "exa mple.com", id="hosts-space"),
    pytest.param("KEY_HOSTS", "ex_ample.com", id="hosts-underscore"),
    pytest.param("KEY_HOSTS", "example.com:99999", id="hosts-port"),
    pytest.param("KEY_HOSTS", "[::1", id="hosts-bracket"),
    pytest.param("KEY_HOSTS", "[zz::1]", id="hosts-ipv6"),
    pytest.param("KEY_HOSTS", "a..b", id="hosts-empty-label"),
    pytest.param("MAX_BYTES", "0", id="max_bytes-zero"),
    pytest.param("MAX_BYTES", "lots", id="max_bytes-text"),
    pytest.param("MAX_BYTES", "20XB", id="max_bytes-unit"),
    pytest.param("MAX_PIXELS", "0", id="max_pixels-zero"),
    pytest.param("MAX_PIXELS", "1e6", id="max_pixels-float"),
    pytest.param("MAX_PIXELS", "-5", id="max_pixels-negative"),
    pytest.param("MAX_SIDE", "abc", id="max_side"),
    pytest.param("MAX_FRAMES", "0", id="max_frames"),
    pytest.param("SVG", "allow", id="svg"),
    pytest.param("MAX_SVG_BYTES", "0", id="max_svg_bytes"),
    pytest.param("SVG_MAX_NODES", "0", id="svg_max_nodes"),
    pytest.param("SVG_DATA_IMAGES", "sometimes", id="svg_data_images"),
    pytest.param("NEGOTIATE", "maybe", id="negotiate"),
    pytest.param("NEGOTIATE", "2", id="negotiate-number"),
    pytest.param("CACHE_BYTES", "-1", id="cache_bytes-negative"),
    pytest.param("CACHE_BYTES", "lots", id="cache_bytes-text"),
    pytest.param("CACHE_TTL", "0", id="cache_ttl"),
    pytest.param("DISK_CACHE_DIR", "/tmp/a\x00b", id="disk-nul"),
    pytest.param("DISK_CACHE_BYTES", "0", id="disk_cache_bytes"),
    pytest.param("REDIS_URL", "http://localhost:6379", id="redis-scheme"),
    pytest.param("REDIS_URL", "localhost:6379", id="redis-no-scheme"),
    pytest.param("REDIS_URL", "redis://", id="redis-no-host"),
    pytest.param("REDIS_URL", "redis://host:port", id="redis-bad-port"),
    pytest.param("REDIS_URL", "unix://", id="unix-no-path"),
    pytest.param("CACHE_CONTROL", "public\r\nSet-Cookie: a=1", id="cc-crlf"),
    pytest.param("CACHE_CONTROL", "max-age=60\x00", id="cc-nul"),
    pytest.param("CACHE_CONTROL", "caché", id="cc-non-ascii"),
    pytest.param("MISS_RATE", "lots", id="rate-text"),
    pytest.param("MISS_RATE", "120/fortnight", id="rate-unit"),
    pytest.param("MISS_RATE", "0/minute", id="rate-zero"),
    pytest.param("MISS_RATE", "120/minute;", id="rate-trailing"),
    pytest.param("TRUSTED_PROXIES", "-1", id="trusted_proxies"),
    pytest.param("WORKERS", "0", id="workers"),
    pytest.param("QUEUE", "-1", id="queue"),
    pytest.param("LOG_FORMAT", "xml", id="log_format"),
    pytest.param("CROSS_ORIGIN_RESOURCE_POLICY", "anywhere", id="corp"),
    pytest.param("SURROGATE_KEY", "x-tags", id="surrogate-key"),
    pytest.param("REMOTE_PATH", "/proxy/", id="remote-path-folder"),
    pytest.param("REMOTE_HOSTS", "*.", id="remote-hosts-star-dot"),
    pytest.param("REMOTE_SCHEMES", "ftp", id="remote-schemes"),
    pytest.param("REMOTE_ALLOW_PRIVATE", "maybe", id="remote-allow-private"),
    pytest.param("REMOTE_TIMEOUT", "0", id="remote-timeout"),
]


def check_config_error(exc: ConfigError, variable: str) -> None:
    assert exc.variable == variable
    assert variable in str(exc)
    assert exc.accepted
    assert exc.accepted in str(exc)


@pytest.mark.parametrize(("name", "value"), BAD)
def test_bad_value_raises_config_error_naming_the_variable(name: str, value: str) -> None:
    variable = ENV_PREFIX + name
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    check_config_error(info.value, variable)
    with pytest.raises(ConfigError) as info:
        Settings(**{name.lower(): value})
    check_config_error(info.value, variable)


def test_bad_table_covers_every_variable() -> None:
    assert {ENV_PREFIX + param.values[0] for param in BAD} == set(VARIABLES.values())


BAD_TYPED: list[Any] = [
    pytest.param("max_bytes", True, id="size-bool"),
    pytest.param("max_pixels", 1.5, id="int-float"),
    pytest.param("workers", None, id="int-none"),
    pytest.param("paths", 123, id="paths-int"),
    pytest.param("paths", {"/a": 1}, id="paths-dict"),
    pytest.param("formats", None, id="formats-none"),
    pytest.param("secret_key", [123], id="key-int"),
    pytest.param("secret_key", [b"\xff" * 20], id="key-not-utf8"),
    pytest.param("negotiate", 1, id="bool-int"),
    pytest.param("disk_cache_dir", b"/srv", id="dir-bytes"),
]


@pytest.mark.parametrize(("name", "value"), BAD_TYPED)
def test_bad_typed_argument_raises_config_error(name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(**{name: value})
    check_config_error(info.value, VARIABLES[name])


# -- secret keys ---------------------------------------------------------------------


def test_key_rotation() -> None:
    settings = Settings.from_env(env(SECRET_KEY="new-key-0123456789,old-key-0123456789"))
    assert settings.secret_key == ("new-key-0123456789", "old-key-0123456789")
    assert not settings.ephemeral_key


@pytest.mark.parametrize("key", ["x" * 15, f"{KEY}, tooshort"], ids=["short", "one-short"])
def test_short_key_rejected_and_redacted(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env(SECRET_KEY=key))
    assert info.value.variable == "IMAGEGUARD_SECRET_KEY"
    assert info.value.value == "<redacted>"
    assert "16" in info.value.accepted
    for part in key.split(","):
        assert part.strip() not in error_chain(info.value)


def test_non_utf8_key_is_not_quoted_in_the_error() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(secret_key=b"\xfe" + b"k" * 20)
    assert info.value.value == "<redacted>"
    assert "0xfe" not in error_chain(info.value)
    assert "kkkk" not in error_chain(info.value)


@pytest.mark.parametrize(
    ("keys", "shown"),
    [((KEY,), "<1 key, redacted>"), ((KEY, OLD_KEY), "<2 keys, redacted>")],
    ids=["one", "two"],
)
def test_redacted_hides_keys(keys: tuple[str, ...], shown: str) -> None:
    settings = Settings(secret_key=keys)
    assert settings.redacted()["secret_key"] == shown
    for key in keys:
        assert key not in str(settings.redacted())
        assert key not in repr(settings)


def test_ephemeral_key() -> None:
    settings = Settings()
    assert settings.ephemeral_key
    assert len(settings.secret_key) == 1
    assert len(settings.secret_key[0]) >= 32
    assert settings.secret_key != Settings().secret_key  # random per instance
    assert settings.redacted()["secret_key"] == "<ephemeral>"
    assert settings.secret_key[0] not in repr(settings)
    assert not Settings(secret_key=KEY).ephemeral_key


def test_replace_keeps_the_ephemeral_key_and_its_flag() -> None:
    settings = Settings()
    copy = settings.replace(max_side=100)
    assert copy.secret_key == settings.secret_key
    assert copy.ephemeral_key
    assert dataclasses.replace(settings, queue=1).ephemeral_key
    rekeyed = settings.replace(secret_key=KEY)
    assert rekeyed.secret_key == (KEY,)
    assert not rekeyed.ephemeral_key


# -- redis password ------------------------------------------------------------------

REDIS_REDACTION: list[Any] = [
    pytest.param("redis://:hunter2@r:6379/0", "redis://:***@r:6379/0", id="password"),
    pytest.param("rediss://user:hunter2@r:6380", "rediss://user:***@r:6380", id="user-password"),
    pytest.param("redis://:p@ss:hunter2@r", "redis://:***@r", id="at-in-password"),
    pytest.param("redis://r:6379/0?password=hunter2&db=1", "redis://r:6379/0?password=***&db=1", id="query"),
    pytest.param("unix://:hunter2@/run/redis.sock", "unix://:***@/run/redis.sock", id="unix"),
    pytest.param("redis://user@r:6379", "redis://user@r:6379", id="no-password"),
]


@pytest.mark.parametrize(("url", "shown"), REDIS_REDACTION)
def test_redis_password_redacted(url: str, shown: str) -> None:
    settings = Settings(redis_url=url)
    assert settings.redis_url == url
    assert settings.redacted()["redis_url"] == shown
    assert "hunter2" not in repr(settings)


def test_redis_password_redacted_in_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env(REDIS_URL="redis://:hunter2@r:notaport"))
    assert info.value.value == "redis://:***@r:notaport"
    assert "hunter2" not in str(info.value)


# -- frozen, hashable, replace, redacted ---------------------------------------------


def test_frozen() -> None:
    settings = Settings(secret_key=KEY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.max_bytes = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.ephemeral_key = True  # type: ignore[misc]


def test_hashable_and_comparable() -> None:
    a = Settings(secret_key=KEY, paths="/a,/b", formats="png,jpg")
    b = Settings(secret_key=[KEY], paths=["/a", "/b"], formats={"jpeg", "png"})
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, Settings(secret_key=KEY)}) == 2


def test_replace_revalidates() -> None:
    settings = Settings(secret_key=KEY)
    assert settings.replace(max_bytes="1KiB").max_bytes == 1024
    assert settings.replace(max_bytes="1KiB").paths == settings.paths
    with pytest.raises(ConfigError) as info:
        settings.replace(max_bytes="0")
    assert info.value.variable == "IMAGEGUARD_MAX_BYTES"
    with pytest.raises(TypeError):
        settings.replace(bogus=1)


def test_redacted_values_are_printable() -> None:
    shown = Settings(secret_key=KEY, paths="/a,/b", formats="png,jpg").redacted()
    assert list(shown) == list(VARIABLES)
    assert shown["paths"] == "/a,/b"
    assert shown["formats"] == "jpeg,png"
    assert shown["redis_url"] == "off"
    assert shown["max_bytes"] == 20 * MiB


ROUND_TRIP: list[Any] = [
    pytest.param({}, id="defaults"),
    pytest.param(
        {
            "paths": "/img,/media",
            "formats": "jpg,svg",
            "signing": "always",
            "signature_max_age": 600,
            "source_params": "v",
            "key_hosts": "a.example,b.example:8080",
            "max_bytes": "1MiB",
            "negotiate": True,
            "cache_bytes": 0,
            "disk_cache_dir": "/srv/cache",
            "redis_url": "redis://r:6379/1",
            "miss_rate": None,
            "workers": 3,
            "log_format": "json",
            "cross_origin_resource_policy": "off",
        },
        id="everything-changed",
    ),
]


@pytest.mark.parametrize("arguments", ROUND_TRIP)
def test_redacted_values_read_back_give_the_same_settings(arguments: dict[str, Any]) -> None:
    settings = Settings(secret_key=KEY, **arguments)
    environ = {
        VARIABLES[name]: str(value) for name, value in settings.redacted().items() if name != "secret_key"
    }
    assert Settings.from_env(environ, secret_key=KEY) == settings


@pytest.mark.parametrize("rate", ["120/minute", "10 per second", "100/2 hours", "5/day;100/month", "1/Years"])
def test_accepted_rates_parse_with_limits(rate: str) -> None:
    limits_util = pytest.importorskip("limits.util")
    assert limits_util.parse_many(Settings(miss_rate=rate).miss_rate)
