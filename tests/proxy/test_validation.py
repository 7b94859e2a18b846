"""Host and request-id validation: the fast checks accept exactly what the regexes state."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.proxy import http
from gateway.proxy.http import _VALID_HOST, _VALID_REQUEST_ID, valid_host, valid_request_id

ID_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/+=@-"
HOST_CHARS = b"[]:.%-_~!$&'()*+,;=0123456789abcdefABCDEFxyzXYZ"
# Mostly the characters each rule is about (plus a few others), so that both answers come up.
ID_LIKE = st.binary(max_size=140) | st.lists(
    st.sampled_from(list(ID_CHARS + b" \x00\xe9\n")), max_size=140
).map(bytes)
HOST_LIKE = st.binary(max_size=30) | st.lists(
    st.sampled_from(list(HOST_CHARS + b" /@\n\xff")), max_size=30
).map(bytes)


@given(ID_LIKE)
def test_valid_request_id_is_the_regex(value: bytes) -> None:
    assert valid_request_id(value) == (_VALID_REQUEST_ID.fullmatch(value) is not None)


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (b"4f6c1d2e9a8b7c6d", True),  # letters and digits only
        (b"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", True),  # a UUID: the translate check
        (b"a" * 128, True),
        (b"a" * 129, False),
        (b"a" * 127 + b"-", True),
        (b"a" * 128 + b"-", False),
        (b"", False),
        (b"abc\n", False),
        (b"ab c", False),
        ("n\u00e9".encode(), False),
        (b"\xe9", False),  # bytes.isalnum is ASCII-only
    ],
)
def test_valid_request_id_edges(value: bytes, valid: bool) -> None:
    assert valid_request_id(value) is valid
    assert (_VALID_REQUEST_ID.fullmatch(value) is not None) is valid


def test_no_request_id_is_not_valid() -> None:
    assert valid_request_id(None) is False


@given(HOST_LIKE)
def test_valid_host_is_the_regex(value: bytes) -> None:
    expected = _VALID_HOST.fullmatch(value) is not None
    assert valid_host(value) == expected
    assert valid_host(value) == expected  # asked again: the cached answer


def test_valid_host_answers_stay_right_across_cache_clears() -> None:
    for i in range(3 * http.HOST_CACHE_SIZE):
        assert valid_host(b"h%d.test:80" % i)
        assert not valid_host(b"h%d.test/x" % i)
    cache = getattr(http, "_HOST_CACHE", None)  # a C global in the compiled build
    if cache is not None:
        assert len(cache) <= http.HOST_CACHE_SIZE


def test_a_host_longer_than_a_real_one_is_checked_every_time_and_not_kept() -> None:
    long_valid = b"a" * 5000 + b":80"
    long_invalid = b"a" * 5000 + b"/x"
    for _ in range(2):
        assert valid_host(long_valid)
        assert not valid_host(long_invalid)
    cache = getattr(http, "_HOST_CACHE", None)  # a C global in the compiled build
    if cache is not None:
        assert long_valid not in cache and long_invalid not in cache
