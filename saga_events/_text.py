"""Registry text and URLs made safe to print (for the CLI).

Registry text comes from publishers and HTTP callers: printed raw, a control
or bidi character could rewrite a terminal or hide what a URL says. A Redis
URL may carry a password, which a start banner must not show.
"""

from __future__ import annotations

import unicodedata
import urllib.parse


def mask_url(url: str) -> str:
    """``url`` with its password (and a user's name kept) replaced by ``****``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None and "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0] if ":" in userinfo else ""
    masked = f"{user}:****@{hostport}" if parts.password is not None or user else f"****@{hostport}"
    return urllib.parse.urlunsplit(parts._replace(netloc=masked))


def escape_text(text: str) -> str:
    """Registry text made safe for a terminal: a repr-like escape of every control,
    format (bidi, zero-width) and separator character but the plain space, and of
    the backslash, so that what is printed is unambiguous and inert."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch != " " and unicodedata.category(ch)[0] in "CZ":
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
                       if code < 0x10000 else f"\\U{code:08x}")  # fmt: skip
        else:
            out.append(ch)
    return "".join(out)
