"""HTTP filters: what they match, how they are parsed, described and serialized."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netmirror.wire.httpfilter import MAX_DEPTH, MAX_LIST, HttpFilter, RequestHead, describe_filter


def head(method: str = "GET", target: str = "/", *headers: tuple[str, str]) -> RequestHead:
    return RequestHead(method=method, target=target, headers=headers)


DEV42 = head("GET", "/api/v2/items?id=1", ("Host", "shop"), ("X-Dev", "feature-42"))


# --- matching ------------------------------------------------------------------------------


def test_header_is_searched_in_name_value_lines_with_the_name_lowercased() -> None:
    filt = HttpFilter.parse({"header": "^x-dev: feature-42$"})
    assert filt.matches(DEV42)
    assert filt.matches(head("GET", "/", ("x-DEV", "feature-42")))
    assert not filt.matches(head("GET", "/", ("X-Dev", "feature-421")))
    assert not filt.matches(head("GET", "/", ("X-Other", "feature-42")))
    assert not filt.matches(head("GET", "/"))


def test_header_value_is_matched_as_sent() -> None:
    filt = HttpFilter.parse({"header": "^x-dev: feature-42$"})
    assert not filt.matches(head("GET", "/", ("X-Dev", "Feature-42")))
    assert HttpFilter.parse({"header": "(?i)^x-dev: feature-42$"}).matches(
        head("GET", "/", ("X-Dev", "FEATURE-42"))
    )


def test_header_matches_if_any_line_matches() -> None:
    filt = HttpFilter.parse({"header": "^cookie: .*dev=alice"})
    request = head("GET", "/", ("Host", "x"), ("Cookie", "a=1"), ("Cookie", "b=2; dev=alice"))
    assert filt.matches(request)


def test_header_search_is_unanchored() -> None:
    filt = HttpFilter.parse({"header": "feature"})
    assert filt.matches(DEV42)


def test_path_is_searched_in_the_request_target_query_included() -> None:
    assert HttpFilter.parse({"path": "^/api/v2/"}).matches(DEV42)
    assert HttpFilter.parse({"path": r"id=1$"}).matches(DEV42)
    assert HttpFilter.parse({"path": "items"}).matches(DEV42)
    assert not HttpFilter.parse({"path": "^/v2"}).matches(DEV42)


def test_method_is_exact_and_compared_upper_cased() -> None:
    filt = HttpFilter.parse({"method": "post"})
    assert filt.matches(head("POST"))
    assert filt.matches(head("post"))
    assert not filt.matches(head("GET"))
    assert not filt.matches(head("POSTX"))


def test_several_keys_must_all_match() -> None:
    filt = HttpFilter.parse({"header": "^x-dev: feature-42$", "path": "^/api/", "method": "GET"})
    assert filt.matches(DEV42)
    assert not filt.matches(head("POST", "/api/x", ("X-Dev", "feature-42")))
    assert not filt.matches(head("GET", "/web/x", ("X-Dev", "feature-42")))
    assert not filt.matches(head("GET", "/api/x", ("X-Dev", "feature-43")))


def test_any_of_needs_one_and_all_of_needs_all() -> None:
    any_of = HttpFilter.parse({"any_of": [{"path": "^/alice/"}, {"header": "^x-dev: alice$"}]})
    assert any_of.matches(head("GET", "/alice/x"))
    assert any_of.matches(head("GET", "/", ("X-Dev", "alice")))
    assert not any_of.matches(head("GET", "/bob/", ("X-Dev", "bob")))

    all_of = HttpFilter.parse({"all_of": [{"path": "^/alice/"}, {"header": "^x-dev: alice$"}]})
    assert all_of.matches(head("GET", "/alice/x", ("X-Dev", "alice")))
    assert not all_of.matches(head("GET", "/alice/x"))
    assert not all_of.matches(head("GET", "/", ("X-Dev", "alice")))


def test_nested_filters_combine_with_the_keys_beside_them() -> None:
    filt = HttpFilter.parse(
        {
            "method": "POST",
            "any_of": [
                {"all_of": [{"path": "^/orders"}, {"header": "^x-dev: a$"}]},
                {"header": "^x-debug: 1$"},
            ],
        }
    )
    assert filt.matches(head("POST", "/orders/1", ("X-Dev", "a")))
    assert filt.matches(head("POST", "/", ("X-Debug", "1")))
    assert not filt.matches(head("GET", "/", ("X-Debug", "1")))
    assert not filt.matches(head("POST", "/orders/1", ("X-Dev", "b")))


def test_regexes_are_compiled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    filt = HttpFilter.parse({"header": "^x-dev: feature-42$", "any_of": [{"path": "^/api"}]})

    def no_compile(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled while matching")

    monkeypatch.setattr(re, "compile", no_compile)
    assert filt.matches(DEV42)


def test_request_head_header_lines() -> None:
    assert DEV42.header_lines == ("host: shop", "x-dev: feature-42")


# --- parsing errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (
            {"header": "x-dev: ("},
            "http_filter.header: 'x-dev: (' is not a valid regular expression "
            "(missing ), unterminated subpattern at position 7)",
        ),
        (
            {"any_of": [{"path": "^/a"}, {"method": 3}]},
            "http_filter.any_of[1].method: must be a string",
        ),
        (
            {"heder": "x"},
            "http_filter: unknown key 'heder' "
            "(expected one of header, path, method, any_of, all_of)",
        ),
        ({}, "http_filter: empty filter (give header, path, method, any_of or all_of)"),
        ("header", "http_filter: must be a mapping (got str)"),
        ({"header": 3}, "http_filter.header: must be a string"),
        ({"header": None}, "http_filter.header: must be a string"),
        ({"path": ""}, "http_filter.path: must not be empty"),
        ({"path": "[a-"}, "http_filter.path: '[a-' is not a valid regular expression"),
        ({"method": "GE T"}, "http_filter.method: 'GE T' is not an HTTP method"),
        ({"method": ""}, "http_filter.method: '' is not an HTTP method"),
        ({"any_of": {"path": "x"}}, "http_filter.any_of: must be a list of filters"),
        ({"all_of": "x"}, "http_filter.all_of: must be a list of filters"),
        ({"all_of": []}, "http_filter.all_of: must not be empty"),
        ({"all_of": [{}]}, "http_filter.all_of[0]: empty filter"),
        ({"any_of": [3]}, "http_filter.any_of[0]: must be a mapping (got int)"),
        (
            {"all_of": [{"any_of": [{"path": "a"}, {"path": "b"}, {"hedaer": "c"}]}]},
            "http_filter.all_of[0].any_of[2]: unknown key 'hedaer'",
        ),
        ({1: "x"}, "http_filter: unknown key 1"),
    ],
)
def test_parse_errors_name_the_key_path(obj: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        HttpFilter.parse(obj)
    assert str(info.value).startswith(message)


def test_parse_error_uses_the_given_location() -> None:
    with pytest.raises(ValueError, match=r"^ports\[2\]\.http_filter\.path: must be a string$"):
        HttpFilter.parse({"path": 1}, where="ports[2].http_filter")


def nested(levels: int) -> dict[str, Any]:
    obj: dict[str, Any] = {"path": "^/x"}
    for _ in range(levels - 1):
        obj = {"any_of": [obj]}
    return obj


def test_nesting_depth_is_capped() -> None:
    HttpFilter.parse(nested(MAX_DEPTH))
    with pytest.raises(ValueError, match=r"nested too deeply \(at most 8 levels\)") as info:
        HttpFilter.parse(nested(MAX_DEPTH + 1))
    assert str(info.value).startswith("http_filter" + ".any_of[0]" * MAX_DEPTH + ":")


def test_list_length_is_capped() -> None:
    HttpFilter.parse({"any_of": [{"path": "x"}] * MAX_LIST})
    with pytest.raises(ValueError, match=r"^http_filter\.any_of: at most 64 filters \(got 65\)$"):
        HttpFilter.parse({"any_of": [{"path": "x"}] * (MAX_LIST + 1)})


# --- description and serialization -----------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "text"),
    [
        ({"header": "^x-dev: feature-42$"}, "header ~ ^x-dev: feature-42$"),
        (
            {"method": "post", "header": "^x-dev: feature-42$"},
            "header ~ ^x-dev: feature-42$ and method = POST",
        ),
        ({"path": "^/api/", "method": "GET"}, "path ~ ^/api/ and method = GET"),
        ({"any_of": [{"path": "^/a"}, {"path": "^/b"}]}, "path ~ ^/a or path ~ ^/b"),
        ({"any_of": [{"path": "^/a"}]}, "path ~ ^/a"),
        (
            {"method": "GET", "any_of": [{"path": "^/a"}, {"path": "^/b", "method": "PUT"}]},
            "method = GET and (path ~ ^/a or (path ~ ^/b and method = PUT))",
        ),
        ({"all_of": [{"path": "^/a"}, {"header": "b"}]}, "path ~ ^/a and header ~ b"),
        (
            {"all_of": [{"any_of": [{"path": "a"}, {"path": "b"}]}, {"method": "GET"}]},
            "(path ~ a or path ~ b) and method = GET",
        ),
    ],
)
def test_describe(obj: dict[str, Any], text: str) -> None:
    assert HttpFilter.parse(obj).describe() == text
    assert describe_filter(obj) == text


def test_describe_filter_never_raises() -> None:
    assert describe_filter({"path": 1}) == "invalid filter (http_filter.path: must be a string)"


def test_to_json_is_canonical_and_parses_back() -> None:
    obj = {
        "all_of": [{"method": "get"}],
        "method": "delete",
        "any_of": [{"path": "^/a", "header": "b"}],
        "header": "^x-dev: 1$",
    }
    filt = HttpFilter.parse(obj)
    assert filt.to_json() == {
        "header": "^x-dev: 1$",
        "method": "DELETE",
        "any_of": [{"header": "b", "path": "^/a"}],
        "all_of": [{"method": "GET"}],
    }
    assert list(filt.to_json()) == ["header", "method", "any_of", "all_of"]
    assert HttpFilter.parse(filt.to_json()) == filt


def test_constructor_is_parse_of_keywords() -> None:
    by_keywords = HttpFilter(header="^x-dev: a$", method="get", any_of=[{"path": "^/a"}])
    by_parse = HttpFilter.parse(
        {"header": "^x-dev: a$", "method": "GET", "any_of": [{"path": "^/a"}]}
    )
    assert by_keywords == by_parse
    assert hash(by_keywords) == hash(by_parse)
    composed = HttpFilter(any_of=[by_keywords, {"path": "^/b"}])
    assert composed.to_json()["any_of"][0] == by_parse.to_json()
    with pytest.raises(ValueError, match=r"^http_filter: empty filter"):
        HttpFilter()
    with pytest.raises(ValueError, match=r"^http_filter\.header: "):
        HttpFilter(header="(")


def test_equality_and_repr() -> None:
    a = HttpFilter.parse({"path": "^/a"})
    assert a == HttpFilter.parse({"path": "^/a"})
    assert a != HttpFilter.parse({"path": "^/b"})
    assert a != "path ~ ^/a"
    assert repr(a) == "HttpFilter.parse({'path': '^/a'})"


REGEX = st.sampled_from(["^/a", "b$", "x-dev: [0-9]+", "(?i)^host: .*", r"\d", "a|b"])
METHOD = st.sampled_from(["GET", "post", "Put", "DELETE", "M-SEARCH"])


def filter_objects() -> st.SearchStrategy[dict[str, Any]]:
    leaf = st.fixed_dictionaries(
        {}, optional={"header": REGEX, "path": REGEX, "method": METHOD}
    ).filter(bool)

    def extend(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
        lists = st.lists(children, min_size=1, max_size=3)
        return st.fixed_dictionaries(
            {},
            optional={
                "header": REGEX,
                "path": REGEX,
                "method": METHOD,
                "any_of": lists,
                "all_of": lists,
            },
        ).filter(bool)

    return st.recursive(leaf, extend, max_leaves=10)


@settings(deadline=None, max_examples=200)
@given(filter_objects(), st.sampled_from([DEV42, head("POST", "/a/b", ("Host", "h"))]))
def test_round_trip_keeps_meaning(obj: dict[str, Any], request: RequestHead) -> None:
    filt = HttpFilter.parse(obj)
    again = HttpFilter.parse(filt.to_json())
    assert again == filt
    assert again.to_json() == filt.to_json()
    assert again.describe() == filt.describe()
    assert again.matches(request) == filt.matches(request)
