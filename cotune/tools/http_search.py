"""A JSON search endpoint as a tool: ``GET url?q=QUERY&k=K``.

The endpoint answers ``{"results": [{"text": ..., "title": ...}, ...]}`` (items may also be plain
strings) or a bare list of strings. Only hosts on the allow-list are called, and a host that
resolves to a loopback, private, link-local or otherwise internal address is refused unless it is
also in ``private_hosts`` (no SSRF). Redirects are not followed.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection
from typing import Any
from urllib.parse import urlsplit

from cotune.errors import ToolError
from cotune.tools.bm25 import render_passage

DEFAULT_TIMEOUT = 10.0


def check_url(url: str, allowed_hosts: Collection[str], private_hosts: Collection[str] = ()) -> str:
    """Refuse a URL the server may not call; return its host."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 0
    if parts.scheme not in ("http", "https") or not host or not port:
        raise ToolError(f"http_search: {url!r} is not an http(s) URL with a host (and port)")
    if host not in {h.lower() for h in allowed_hosts}:
        raise ToolError(
            f"http_search: host {host!r} is not on the allow-list {sorted(allowed_hosts)}"
        )
    if host in {h.lower() for h in private_hosts}:
        return host
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise ToolError(f"http_search: host {host!r} does not resolve: {err}") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if _is_internal(address):
            raise ToolError(
                f"http_search: host {host!r} resolves to the internal address {address}; refused"
            )
    return host


def _is_internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Anything not on the public internet: besides private, loopback, link-local, reserved,
    multicast and unspecified addresses, ``is_global`` also excludes 100.64.0.0/10 (carrier-
    grade NAT, where some clouds put their metadata service), documentation and benchmarking
    ranges, which none of the other flags cover."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def search_http(
    url: str,
    query: str,
    k: int,
    allowed_hosts: Collection[str],
    private_hosts: Collection[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> list[str]:
    """Top ``k`` passages for ``query``; one retry on a network error or a 5xx answer."""
    import httpx

    host = check_url(url, allowed_hosts, private_hosts)
    last = ""
    for _ in range(2):
        try:
            response = httpx.get(
                url, params={"q": query, "k": k}, timeout=timeout, follow_redirects=False
            )
        except httpx.HTTPError as err:
            last = f"{type(err).__name__}: {err}"
            continue
        if response.status_code >= 500:
            last = f"HTTP {response.status_code}"
            continue
        if response.status_code != 200:
            raise ToolError(f"http_search: host {host!r} answered HTTP {response.status_code}")
        try:
            return parse_results(response.json())[:k]
        except ValueError as err:
            raise ToolError(f"http_search: host {host!r} answered {err}") from None
    raise ToolError(f"http_search: host {host!r} failed twice ({last})")


def parse_results(body: Any) -> list[str]:
    """Passages from ``{"results": [...]}`` or a bare list; items are strings or
    ``{"text", "title"?}`` objects. Raises ValueError on any other shape."""
    items = body.get("results") if isinstance(body, dict) else body
    if not isinstance(items, list):
        raise ValueError('not {"results": [...]} nor a JSON list')
    passages = []
    for item in items:
        if isinstance(item, str):
            passages.append(item)
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            passages.append(render_passage(item))
        else:
            raise ValueError(f"a result that is neither a string nor {{'text': ...}}: {item!r}")
    return passages
