"""Redis URLs saga-events accepts, parsed and checked (internal; re-exported by topology).

One job: turn a URL string into a :class:`TopologyURL` or raise a one-line
:class:`~saga_events.errors.TopologyError` naming the part at fault, with
passwords redacted. No I/O. The URL forms are described in
:mod:`saga_events.topology`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode

from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS

from .errors import TopologyError

ReadFrom = Literal["master", "replica"]
Address = tuple[str, int]

#: The schemes this module adds to redis-py's ``redis://``, ``rediss://`` and ``unix://``.
SCHEMES: Final = frozenset({"redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster"})
_PLAIN: Final = frozenset({"redis", "rediss", "unix"})
_OURS: Final = frozenset({"read_from", "sentinel_username", "sentinel_password"})
_HOST_RE: Final = re.compile(r"^[A-Za-z0-9_.-]+$")
_DEFAULT_PORT: Final = {"sentinel": 26379, "cluster": 6379}


def _redact(url: str) -> str:
    """The URL with its passwords replaced by ``***`` (errors must not leak them)."""
    scheme, sep, rest = url.partition("://")
    if sep:
        end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        userinfo, at, hosts = rest[:end].rpartition("@")
        if at and ":" in userinfo:
            rest = f"{userinfo.partition(':')[0]}:***@{hosts}{rest[end:]}"
        url = f"{scheme}{sep}{rest}"
    return re.sub(r"(password=)[^&#]*", r"\1***", url)


def _scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def is_topology_url(url: str) -> bool:
    """True for a URL this module must handle: a new scheme, or a ``read_from`` option."""
    scheme = _scheme_of(url)
    if scheme in SCHEMES:
        return True
    query = url.split("?", 1)[1] if "?" in url else ""
    return scheme in _PLAIN and any(k == "read_from" for k, _ in parse_qsl(query))


@dataclass(frozen=True, slots=True)
class TopologyURL:
    """A parsed Redis URL. ``text`` is the URL with passwords redacted, for messages."""

    kind: Literal["plain", "sentinel", "cluster"]
    text: str
    tls: bool = False
    hosts: tuple[Address, ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    master_name: str | None = None
    db: int = 0
    read_from: ReadFrom = "master"
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    options: tuple[tuple[str, str], ...] = ()
    #: kind == "plain": redis-py's URL without our options
    plain_url: str | None = field(default=None, repr=False)

    def node_url(self, address: Address) -> str:
        """A ``redis://`` URL for one data node of this topology."""
        user = quote(self.username or "", safe="")
        auth = f"{user}:{quote(self.password, safe='')}@" if self.password else ""
        if not auth and user:
            auth = f"{user}@"
        return self._url(address, auth, self.db)

    def sentinel_url(self, address: Address) -> str:
        user = quote(self.sentinel_username or "", safe="")
        pw = self.sentinel_password
        auth = f"{user}:{quote(pw, safe='')}@" if pw else (f"{user}@" if user else "")
        return self._url(address, auth, 0)

    def _url(self, address: Address, auth: str, db: int) -> str:
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        query = f"?{urlencode(self.options)}" if self.options else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}{host}:{address[1]}/{db}{query}"


def parse_url(url: str) -> TopologyURL:
    """Parse any Redis URL saga-events accepts; raise TopologyError naming the part at fault."""
    if not isinstance(url, str):
        raise TopologyError(repr(url), "URL", "must be a string")
    text = _redact(url)
    scheme = _scheme_of(url)
    if scheme in _PLAIN:
        return _parse_plain(url, text, scheme)
    if scheme not in SCHEMES:
        known = ", ".join(sorted(SCHEMES | {"redis", "rediss", "unix"}))
        raise TopologyError(text, "scheme", f"{scheme or 'none'!r} is not one of {known}")
    kind: Literal["sentinel", "cluster"] = "sentinel" if scheme.endswith("sentinel") else "cluster"
    rest = url.split("://", 1)[1]
    if "#" in rest:
        raise TopologyError(text, "fragment", "a Redis URL has no #fragment")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
        if password == "":
            raise TopologyError(text, "password", "empty after ':' (drop the ':' or give one)")
    hosts = _parse_hosts(text, hostlist, _DEFAULT_PORT[kind])
    master_name, db = _parse_path(text, kind, path if slash else "")
    opts = _parse_query(text, kind, query)
    read_from = opts.pop("read_from", "master")
    return TopologyURL(
        kind=kind,
        text=text,
        tls=scheme.startswith("rediss"),
        hosts=hosts,
        username=username,
        password=password,
        master_name=master_name,
        db=db,
        read_from=read_from,  # type: ignore[arg-type]  # checked in _parse_query
        sentinel_username=opts.pop("sentinel_username", None),
        sentinel_password=opts.pop("sentinel_password", None),
        options=tuple(sorted(opts.items())),
    )


def _parse_plain(url: str, text: str, scheme: str) -> TopologyURL:
    base, _, query = url.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    read_from = "master"
    kept = []
    for key, value in pairs:
        if key == "read_from":
            read_from = _check_read_from(text, value)
        elif key in ("sentinel_username", "sentinel_password"):
            raise TopologyError(
                text, f"query {key}", f"only for redis+sentinel://, not {scheme}://"
            )
        else:
            kept.append((key, value))
    if read_from == "replica":
        raise TopologyError(
            text,
            "query read_from",
            f"'replica' needs a topology that knows its replicas (redis+sentinel:// or "
            f"redis+cluster://); {scheme}:// names one node",
        )
    plain = base + (f"?{urlencode(kept)}" if kept else "")
    return TopologyURL(kind="plain", text=text, tls=scheme == "rediss", plain_url=plain)


def _parse_hosts(text: str, hostlist: str, default_port: int) -> tuple[Address, ...]:
    if not hostlist:
        raise TopologyError(text, "host list", "empty: give at least one host:port")
    hosts: list[Address] = []
    for item in hostlist.split(","):
        if not item:
            raise TopologyError(text, "host list", "an empty entry (two commas, or a trailing one)")
        if item.startswith("["):
            host, bracket, port_text = item[1:].partition("]")
            if not bracket or (port_text and not port_text.startswith(":")):
                raise TopologyError(text, f"host {item!r}", "an IPv6 address is [addr]:port")
            port_text = port_text[1:]
        else:
            host, _, port_text = item.partition(":")
            if not _HOST_RE.match(host or "-!"):
                raise TopologyError(text, f"host {item!r}", "not a host name or IPv4 address")
        port = default_port
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise TopologyError(text, f"port in {item!r}", "must be a number in 1..65535")
            port = int(port_text)
        if (host, port) in hosts:
            raise TopologyError(text, f"host {item!r}", "listed twice")
        hosts.append((host, port))
    return tuple(hosts)


def _parse_path(text: str, kind: str, path: str) -> tuple[str | None, int]:
    parts = [unquote(p) for p in path.split("/")] if path else []
    if parts and parts[-1] == "":
        parts.pop()  # one trailing slash is harmless
    if kind == "cluster":
        if parts not in ([], ["0"]):
            raise TopologyError(
                text, "path", "a Cluster has only db 0; put nothing after the hosts"
            )
        return None, 0
    if not parts or not parts[0]:
        raise TopologyError(text, "master name", "missing: the path is /<master-name>[/<db>]")
    if len(parts) > 2:
        raise TopologyError(text, "path", "too many segments: the path is /<master-name>[/<db>]")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise TopologyError(text, "db", f"{parts[1]!r} is not a database number")
        db = int(parts[1])
    return parts[0], db


def _check_read_from(text: str, value: str) -> ReadFrom:
    if value == "master":
        return "master"
    if value == "replica":
        return "replica"
    raise TopologyError(text, "query read_from", f"{value!r} is not 'master' or 'replica'")


def _parse_query(text: str, kind: str, query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise TopologyError(text, "query", "not name=value pairs joined by '&'") from None
    opts: dict[str, str] = {}
    for key, value in pairs:
        if key in opts:
            raise TopologyError(text, f"query {key}", "given twice")
        if key == "read_from":
            _check_read_from(text, value)
        elif key.startswith("sentinel_") and kind != "sentinel":
            raise TopologyError(text, f"query {key}", "only for redis+sentinel://")
        elif key in ("db", "host", "port", "username", "password"):
            raise TopologyError(text, f"query {key}", "goes in the URL itself, not the query")
        elif key not in _OURS and key not in URL_QUERY_ARGUMENT_PARSERS:
            if not key.startswith("ssl_") and key != "client_name":
                raise TopologyError(text, f"query {key}", "unknown option")
        elif key in URL_QUERY_ARGUMENT_PARSERS:
            try:
                URL_QUERY_ARGUMENT_PARSERS[key](value)
            except (TypeError, ValueError):
                raise TopologyError(text, f"query {key}", f"{value!r} is not valid") from None
        opts[key] = value
    return opts


def with_read_from(url: str, read_from: str) -> str:
    """``url`` with its ``read_from`` query option set to ``read_from`` (replacing one
    already there); the result is checked as :func:`parse_url` checks any URL."""
    if read_from not in ("master", "replica"):
        reason = f"{read_from!r} is not 'master' or 'replica'"
        raise TopologyError(_redact(url), "read_from", reason)
    base, _, fragment = url.partition("#")
    base, _, query = base.partition("?")
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "read_from"]
    pairs.append(("read_from", read_from))
    out = f"{base}?{urlencode(pairs)}" + (f"#{fragment}" if fragment else "")
    parse_url(out)
    return out
