"""Which HTTP requests a session steals: filters over a request's head.

A filter comes from a session's configuration (``http_filter:``), e.g.::

    {"header": "^x-dev: feature-42$"}
    {"path": "^/api/", "method": "POST"}
    {"any_of": [{"header": "^x-dev: alice$"}, {"path": "^/alice/"}]}

Keys:

* ``header``: a regular expression searched (:func:`re.search`) in each header line
  rendered as ``name: value``, the name in lower case and the value as sent; the
  filter matches if any line matches;
* ``path``: a regular expression searched in the request-target (path and query, as
  sent: ``/api/v2/x?y=1``);
* ``method``: the method, compared upper-cased;
* ``any_of``: a list of filters, at least one of which must match;
* ``all_of``: a list of filters, all of which must match.

Several keys in one object must all match. Regular expressions are case-sensitive
(write ``(?i)`` for the contrary) and compiled once, when the filter is parsed.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

#: Keys of a filter object, in the order they are described and serialized.
KEYS: Final = ("header", "path", "method", "any_of", "all_of")
#: Deepest nesting of ``any_of``/``all_of`` (the top-level filter is level 1).
MAX_DEPTH: Final = 8
#: Longest ``any_of``/``all_of`` list.
MAX_LIST: Final = 64

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True)
class RequestHead:
    """What a filter sees of a request: its request line and headers."""

    method: str
    """The method as sent, e.g. ``"GET"``."""
    target: str
    """The request-target as sent, e.g. ``"/api/v2/x?y=1"``."""
    headers: tuple[tuple[str, str], ...]
    """``(name, value)`` pairs in order: names as sent, values decoded as latin-1."""

    @functools.cached_property
    def header_lines(self) -> tuple[str, ...]:
        """Each header as ``name: value``, the name in lower case (what ``header`` searches)."""
        return tuple(f"{name.lower()}: {value}" for name, value in self.headers)


class HttpFilter:
    """A parsed, compiled filter; build one with :meth:`parse`."""

    __slots__ = ("_all_of", "_any_of", "_header", "_method", "_path")

    _header: re.Pattern[str] | None
    _path: re.Pattern[str] | None
    _method: str | None
    _any_of: tuple[HttpFilter, ...]
    _all_of: tuple[HttpFilter, ...]

    def __init__(
        self,
        *,
        header: str | None = None,
        path: str | None = None,
        method: str | None = None,
        any_of: list[HttpFilter | Mapping[str, Any]] | None = None,
        all_of: list[HttpFilter | Mapping[str, Any]] | None = None,
    ) -> None:
        """Same as :meth:`parse` of the keys given (not ``None``); raises ValueError."""
        given = {
            key: value
            for key, value in (
                ("header", header),
                ("path", path),
                ("method", method),
                ("any_of", any_of),
                ("all_of", all_of),
            )
            if value is not None
        }
        parsed = _parse(given, "http_filter", 1)
        self._header = parsed._header
        self._path = parsed._path
        self._method = parsed._method
        self._any_of = parsed._any_of
        self._all_of = parsed._all_of

    @classmethod
    def parse(cls, obj: Mapping[str, Any], where: str = "http_filter") -> HttpFilter:
        """Validate and compile a filter object.

        Raises ValueError whose message starts with the key path of the fault, e.g.
        ``http_filter.any_of[1].method: must be a string``.
        """
        return _parse(obj, where, 1)

    # --- use -------------------------------------------------------------------------

    def matches(self, head: RequestHead) -> bool:
        """Whether the request of ``head`` is to be stolen."""
        if self._method is not None and head.method.upper() != self._method:
            return False
        if self._path is not None and self._path.search(head.target) is None:
            return False
        if self._header is not None:
            pattern = self._header
            if not any(pattern.search(line) is not None for line in head.header_lines):
                return False
        if self._all_of and not all(f.matches(head) for f in self._all_of):
            return False
        return not self._any_of or any(f.matches(head) for f in self._any_of)

    def describe(self) -> str:
        """One line for status output, e.g. ``header ~ ^x-dev: a$ and method = POST``."""
        terms = self._terms()
        if len(terms) == 1 and not self._header and not self._path and not self._method:
            if len(self._any_of) > 1 and not self._all_of:
                return " or ".join(f._grouped() for f in self._any_of)
        return " and ".join(terms)

    def to_json(self) -> dict[str, Any]:
        """The filter as a config object; :meth:`parse` of it gives an equal filter."""
        out: dict[str, Any] = {}
        if self._header is not None:
            out["header"] = self._header.pattern
        if self._path is not None:
            out["path"] = self._path.pattern
        if self._method is not None:
            out["method"] = self._method
        if self._any_of:
            out["any_of"] = [f.to_json() for f in self._any_of]
        if self._all_of:
            out["all_of"] = [f.to_json() for f in self._all_of]
        return out

    # --- helpers ---------------------------------------------------------------------

    def _terms(self) -> list[str]:
        terms: list[str] = []
        if self._header is not None:
            terms.append(f"header ~ {self._header.pattern}")
        if self._path is not None:
            terms.append(f"path ~ {self._path.pattern}")
        if self._method is not None:
            terms.append(f"method = {self._method}")
        if self._any_of:
            alternatives = [f._grouped() for f in self._any_of]
            if len(alternatives) == 1:
                terms.append(alternatives[0])
            else:
                terms.append("(" + " or ".join(alternatives) + ")")
        for f in self._all_of:
            terms.append(f._grouped())
        return terms

    def _grouped(self) -> str:
        terms = self._terms()
        return terms[0] if len(terms) == 1 else "(" + " and ".join(terms) + ")"

    def _depth(self) -> int:
        children = self._any_of + self._all_of
        return 1 + max((f._depth() for f in children), default=0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HttpFilter):
            return NotImplemented
        return self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_json(), sort_keys=True))

    def __repr__(self) -> str:
        return f"HttpFilter.parse({self.to_json()!r})"


def describe_filter(obj: Mapping[str, Any]) -> str:
    """:meth:`HttpFilter.describe` of a config object; never raises."""
    try:
        return HttpFilter.parse(obj).describe()
    except ValueError as exc:
        return f"invalid filter ({exc})"


# --- parsing ---------------------------------------------------------------------------


def _parse(obj: object, where: str, depth: int) -> HttpFilter:
    if isinstance(obj, HttpFilter):
        if depth - 1 + obj._depth() > MAX_DEPTH:
            raise ValueError(f"{where}: nested too deeply (at most {MAX_DEPTH} levels)")
        return obj
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: must be a mapping (got {type(obj).__name__})")
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: nested too deeply (at most {MAX_DEPTH} levels)")
    for key in obj:
        if key not in KEYS:
            raise ValueError(f"{where}: unknown key {key!r} (expected one of {', '.join(KEYS)})")
    if not obj:
        raise ValueError(f"{where}: empty filter (give header, path, method, any_of or all_of)")
    filt = object.__new__(HttpFilter)
    filt._header = _regex(obj, "header", where)
    filt._path = _regex(obj, "path", where)
    filt._method = _method(obj, where)
    filt._any_of = _children(obj, "any_of", where, depth)
    filt._all_of = _children(obj, "all_of", where, depth)
    return filt


def _regex(obj: Mapping[str, Any], key: str, where: str) -> re.Pattern[str] | None:
    if key not in obj:
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}.{key}: must be a string")
    if not value:
        raise ValueError(f"{where}.{key}: must not be empty")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(
            f"{where}.{key}: {value!r} is not a valid regular expression ({exc})"
        ) from None


def _method(obj: Mapping[str, Any], where: str) -> str | None:
    if "method" not in obj:
        return None
    value = obj["method"]
    if not isinstance(value, str):
        raise ValueError(f"{where}.method: must be a string")
    if _TOKEN.fullmatch(value) is None:
        raise ValueError(f"{where}.method: {value!r} is not an HTTP method (e.g. GET, POST)")
    return value.upper()


def _children(obj: Mapping[str, Any], key: str, where: str, depth: int) -> tuple[HttpFilter, ...]:
    if key not in obj:
        return ()
    value = obj[key]
    if not isinstance(value, list | tuple):
        raise ValueError(f"{where}.{key}: must be a list of filters")
    if not value:
        raise ValueError(f"{where}.{key}: must not be empty")
    if len(value) > MAX_LIST:
        raise ValueError(f"{where}.{key}: at most {MAX_LIST} filters (got {len(value)})")
    return tuple(_parse(item, f"{where}.{key}[{i}]", depth + 1) for i, item in enumerate(value))
