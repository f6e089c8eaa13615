"""The sans-I/O core as a table: request in, decision out."""

from __future__ import annotations

from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imageguard import Settings
from imageguard.core import PASS, Core, FillPlan, Hit, Request, canonical_transform, normalise_path
from imageguard.errors import BadRequest, InvalidImage, InvalidSignature
from imageguard.raster import Transform
from imageguard.signing import canonical_form
from tests.support import SECRET


@pytest.fixture
def core() -> Core:
    return Core(Settings(secret_key=SECRET, source_params="v"), clock=lambda: 1_700_000_000.0)


@pytest.mark.parametrize(
    ("method", "path", "query"),
    [
        pytest.param("GET", "/", "", id="root"),
        pytest.param("GET", "/page", "x=1", id="page-with-query"),
        pytest.param("GET", "/api/data.json", "", id="json"),
        pytest.param("GET", "/png", "", id="no-dot"),
        pytest.param("POST", "/a.png", "", id="post-image"),
        pytest.param("PUT", "/a.png", "w=3", id="put-transform"),
        pytest.param("GET", "/dir.png/page", "", id="dot-in-parent"),
        pytest.param("GET", "/tags/50%-off", "", id="percent-in-a-page-path"),
        pytest.param("GET", "/page;jsessionid=1", "", id="path-parameter-on-a-page"),
    ],
)
def test_pass_through(core: Core, method: str, path: str, query: str) -> None:
    assert core.decide(Request(method, path, query)) is PASS


@pytest.mark.parametrize(
    ("path", "query"),
    [
        pytest.param("/a.png", "", id="png"),
        pytest.param("/A.JPG", "", id="upper-case-extension"),
        pytest.param("/a.tiff", "", id="disallowed-format-still-guarded"),
        pytest.param("/avatar/42", "w=64", id="transform-without-extension"),
        pytest.param("/a.png%2e", "", id="double-encoded-dot"),
        pytest.param("/a.png;x", "", id="path-parameter"),
        pytest.param("/dir\\a.png", "", id="backslash"),
        pytest.param("/a.png. ", "", id="trailing-dot-space"),
    ],
)
def test_guarded(core: Core, path: str, query: str) -> None:
    assert core.is_guarded(path, query)


def test_fill_plan_is_keyed_on_the_canonical_request(core: Core) -> None:
    url = core.url("/a.jpg", w=10, fit="contain", h=5)
    path, _, query = url.partition("?")
    plan = core.decide(Request("GET", path, query))
    assert isinstance(plan, FillPlan)
    assert plan.transform == Transform(w=10, h=5, fit="contain")
    assert plan.upstream_query == ""
    implicit = core.decide(Request("GET", path, core.url("/a.jpg", w=10, h=5).partition("?")[2]))
    assert isinstance(implicit, FillPlan)
    assert implicit.key == plan.key  # fit=contain spelled out or not: one entry
    head = core.decide(Request("HEAD", path, query))
    assert isinstance(head, FillPlan) and head.head and head.key == plan.key


def test_keys_differ_by_path_transform_source_and_generation(core: Core) -> None:
    def key(path: str, **params: object) -> str:
        p, _, q = core.url(path, **params).partition("?")
        plan = core.decide(Request("GET", p, q))
        assert isinstance(plan, FillPlan)
        return plan.key

    keys = {
        key("/a.jpg"),
        key("/b.jpg"),
        key("/a.jpg", w=10),
        key("/a.jpg", w=11),
        key("/a.jpg", v="1"),
        key("/a.jpg", v="2"),
        key("/a.jpg", fmt="png"),
    }
    assert len(keys) == 7
    before = key("/a.jpg")
    core.purge_all()
    assert key("/a.jpg") != before


def test_source_params_are_canonicalised_for_upstream(core: Core) -> None:
    plan = core.decide(Request("GET", "/a.jpg", "v=a+b%2Fc"))
    assert isinstance(plan, FillPlan)
    assert plan.upstream_query == "v=a%20b%2Fc"
    same = core.decide(Request("GET", "/a.jpg", "v=a%20b/c"))
    assert isinstance(same, FillPlan) and same.key == plan.key


def test_hit_and_not_modified(core: Core) -> None:
    from imageguard.raster import SanitizedImage

    plan = core.decide(Request("GET", "/a.png"))
    assert isinstance(plan, FillPlan)
    entry = core.make_entry(plan.key, "/a.png", SanitizedImage(b"x", "png", "image/png", 1, 1, 1, "png"))
    core.cache.set(plan.key, entry)
    hit = core.decide(Request("GET", "/a.png", if_none_match=entry.etag))
    assert isinstance(hit, Hit) and hit.not_modified and hit.entry is entry
    assert isinstance(core.decide(Request("GET", "/a.png", if_none_match='"x"')), Hit)


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        pytest.param("/a/../b.png", None, id="dotdot"),
        pytest.param("/a/b.png", "/a%2fb.png", id="encoded-slash"),
        pytest.param("/a.png", "/%61.png", id="encoded-unreserved"),
        pytest.param("/a%2e.png", "/a%252e.png", id="double-encoding"),
        pytest.param("a.png", None, id="relative"),
        pytest.param("/a\x00.png", None, id="nul"),
        pytest.param("/a\n.png", None, id="newline"),
        pytest.param("/a.png.", None, id="trailing-dot"),
        pytest.param("//a.png", None, id="empty-segment"),
    ],
)
def test_normalise_path_refuses(path: str, raw: str | None) -> None:
    with pytest.raises(BadRequest) as info:
        normalise_path(path, raw)
    assert info.value.reason == "bad_path" and info.value.status == 400


def test_normalise_path_accepts() -> None:
    assert normalise_path("/caf\u00e9 1.png", "/caf%C3%A9%201.png") == "/caf\u00e9 1.png"
    assert normalise_path("/dir/", "/dir/") == "/dir/"


def test_signature_modes() -> None:
    clock = lambda: 1_700_000_000.0  # noqa: E731
    always = Core(Settings(secret_key=SECRET, signing="always"), clock=clock)
    with pytest.raises(InvalidSignature):
        always.decide(Request("GET", "/a.png"))
    path, _, query = always.url("/a.png").partition("?")
    assert query.startswith("s=")
    assert isinstance(always.decide(Request("GET", path, query)), FillPlan)
    off = Core(Settings(secret_key=SECRET, signing="off"), clock=clock)
    assert isinstance(off.decide(Request("GET", "/a.png", "w=10")), FillPlan)
    assert "s=" not in off.url("/a.png", w=10)
    aged = Core(Settings(secret_key=SECRET, signature_max_age=60), clock=clock)
    url = aged.url("/a.png", w=10)
    assert "e=1700000060" in url
    with pytest.raises(InvalidSignature) as info:
        aged.decide(Request("GET", "/a.png", "w=10&s=" + "A" * 43))
    assert info.value.reason == "missing_expiry"


def test_url_refuses_what_the_middleware_would_refuse(core: Core) -> None:
    for bad in ({"w": 0}, {"fmt": "tiff"}, {"x": 1}, {"s": "abc"}, {"fit": "cover"}):
        with pytest.raises(ValueError):
            core.url("/a.png", **bad)
    with pytest.raises(BadRequest):
        core.url("/../a.png")


def test_canonical_transform_is_total() -> None:
    assert canonical_transform(Transform()) == "w=&h=&fit=contain&q=&fmt="
    assert (
        canonical_transform(Transform(w=1, h=2, fit="cover", q=3, fmt="png"))
        == "w=1&h=2&fit=cover&q=3&fmt=png"
    )


def test_rejections_render_no_store(core: Core) -> None:
    from imageguard.core import error_reply
    from imageguard.errors import Overloaded

    reply = error_reply(Overloaded("overloaded", retry_after=1))
    headers = dict(reply.headers)
    assert reply.status == 503 and headers["Retry-After"] == "1"
    assert headers["Cache-Control"] == "no-store" and headers["X-ImageGuard-Reason"] == "overloaded"


def test_remembered_route_still_expires() -> None:
    now = [1_700_000_000.0]
    core = Core(Settings(secret_key=SECRET), clock=lambda: now[0])
    path, _, query = core.url("/a.png", w=10, e=1_700_000_010).partition("?")
    assert isinstance(core.decide(Request("GET", path, query)), FillPlan)
    assert isinstance(core.decide(Request("GET", path, query)), FillPlan)  # remembered
    now[0] += 11
    with pytest.raises(InvalidSignature) as info:
        core.decide(Request("GET", path, query))
    assert info.value.reason == "expired_signature"


def test_remembered_route_forgets_after_purge_all(core: Core) -> None:
    first = core.decide(Request("GET", "/a.png"))
    core.purge_all()
    second = core.decide(Request("GET", "/a.png"))
    assert isinstance(first, FillPlan) and isinstance(second, FillPlan)
    assert first.key != second.key


def test_body_limit_counts_declared_and_read_bytes() -> None:
    from imageguard.core import BodyLimit

    budget = BodyLimit(10)
    budget.declared([("Content-Type", "image/png"), ("Content-Length", "10")])
    with pytest.raises(InvalidImage) as info:
        budget.declared([("content-length", "11")])
    assert info.value.reason == "too_large"
    budget.add(b"x" * 10)
    with pytest.raises(InvalidImage):
        budget.add(b"y")


def test_fill_host_is_the_servers_own_name_unless_keyed(core: Core) -> None:
    plan = core.decide(Request("GET", "/a.png", host="evil.example"))
    assert isinstance(plan, FillPlan)
    assert plan.host("127.0.0.1", 8000) == "127.0.0.1:8000"
    assert plan.host("img.example", "443") == "img.example"
    keyed = Core(Settings(secret_key=SECRET, key_hosts="a.example")).decide(
        Request("GET", "/a.png", host="A.example")
    )
    assert isinstance(keyed, FillPlan) and keyed.host("127.0.0.1", 80) == "a.example"


_PARAM_VALUES = {"w": "320", "h": "200", "fit": "cover", "q": "80", "fmt": "webp", "e": "1800000000"}


@given(
    names=st.sets(st.sampled_from(sorted(_PARAM_VALUES))),
    source=st.dictionaries(st.sampled_from(["v", "a", "a.b", "a-b", "z"]), st.text("xy/ é", max_size=4)),
    order=st.randoms(use_true_random=False),
)
def test_verify_checks_the_canonical_form_whatever_the_query_order(
    names: set[str], source: dict[str, str], order: Random
) -> None:
    # Core.verify builds the canonical form inline (a fast path for URLs without
    # source parameters): it must agree with canonical_form, the form url() signs,
    # for any subset of parameters in any order, source names included.
    core = Core(Settings(secret_key=SECRET, source_params="v,a,a.b,a-b,z"), clock=lambda: 1_700_000_000.0)
    params = {n: _PARAM_VALUES[n] for n in names}
    if "fit" in params:
        params.update(w="320", h="200")
    url = core.url("/d/a.jpg", **params, **source)
    path, _, query = url.partition("?")
    if not query:
        return  # nothing to sign: url() leaves a plain path unsigned
    parts = query.split("&")
    order.shuffle(parts)
    shuffled, source_params = core.parse_query("&".join(parts))
    core.verify(path, shuffled, source_params)  # accepted in any order
    signed = {k: v for k, v in shuffled.items() if k != "s"} | source_params
    assert core.signer.verify(canonical_form(path, signed), shuffled["s"])
    if "q" not in shuffled:  # one parameter more than was signed
        with pytest.raises(InvalidSignature):
            core.verify(path, {**shuffled, "q": "50"}, source_params)


@pytest.mark.parametrize("expiry", ["", "abc", "1e3", "%31", "01", "\uff13\uff12"])
def test_a_malformed_expiry_is_400_signed_or_not(core: Core, expiry: str) -> None:
    # Found by tests/test_fuzz.py: an unsigned ?e= that is not a canonical integer
    # used to reach int() and escape as ValueError (a 500 from either adapter).
    with pytest.raises(BadRequest) as raised:
        core.decide(Request("GET", "/a.png", f"e={expiry}"))
    assert raised.value.reason == "bad_param_value"
    with pytest.raises(ValueError, match="e must be"):
        core.url("/a.png", w=10, e=expiry)
