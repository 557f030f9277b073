"""PII replacement of the clean stage: e-mail addresses, phone numbers and IP addresses.

What FineWeb does with datatrove's PII formatter, plus phone numbers: every match is replaced by
a fixed placeholder and counted. The placeholders are fixed (not drawn in turn from a list, as
datatrove's are) so that a document's output does not depend on which worker saw it, or after
which documents: 1 and N clean workers write the same text.

- **e-mail**: ``local@domain.tld`` (case-insensitive; the domain may be Cyrillic, e.g. ``.рф``,
  ``.қаз``) -> ``email@example.com`` (example.com is reserved for examples, RFC 2606). Image
  names such as ``logo@2x.png`` are not addresses.
- **IP**: IPv4 dotted quads and IPv6 addresses that :mod:`ipaddress` accepts. With
  ``public_ips_only`` (the default, as in datatrove) only globally routable addresses are PII:
  ``127.0.0.1``, ``192.168.1.1``, ``10.0.0.1`` in a tutorial stay. IPv4 -> ``192.0.2.1``,
  IPv6 -> ``2001:db8::1``: documentation addresses (RFC 5737, RFC 3849), never routed, and
  themselves not public, so running the step twice changes nothing. A dotted quad right after a
  version, revision or section word (``version 1.2.3.4``, ``revision 1.17.2.7``, ``нұсқасы 2.0.1.5``,
  ``пункт 1.2.3.4``) is not an address; ``v1.2.3.4`` and ``1.2.3.4.5`` are not matched at all.
- **phone**: the formats written in kk/ru/en text, each as a whole (never a piece of a longer
  number, a date, a URL path or an ISBN):

  * international, ``+`` and 8-15 digits: ``+7 701 123 45 67``, ``+7 (727) 123-45-67``,
    ``+77011234567``, ``+44 20 7946 0958``, ``+1-202-555-0143``;
  * Kazakhstan/Russia trunk prefix 8 and 11 digits: ``8 (727) 123-45-67``, ``8 701 123 45 67``,
    ``8-800-555-35-35``, ``87011234567`` (run together only with a code starting 3-9);
  * a bracketed city code and 10 digits: ``(727) 123-45-67``, ``(7172) 12-34-56``;
  * a 7-digit local number ``123-45-67`` (hyphens only);
  * North American ``(202) 555-0143``, ``202-555-0143``, ``202.555.0143`` (area code and
    exchange start 2-9).

  -> ``+7 000 000 00 00`` (no such code exists in the +7 plan). Not phones: years, dates
  (``2023-01-01``, ``01.02.2023``), prices and numbers grouped by thousands (``1 500 000``,
  ``+1 500 000 000``), decimals, ISBNs, times.

Order: e-mail, IPv6, IPv4, phone (an address's digits are gone before phones are looked for).
A match equal to its placeholder is left alone and not counted.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable

from pydantic import Field

from pipeline.config import StrictModel

PII_KINDS = ("email", "phone", "ip")


class PIIConfig(StrictModel):
    """Which personal data the clean stage replaces in the documents it keeps (see pipeline/data/pii.py)."""

    enabled: bool = Field(True, description="replace e-mail addresses, phone numbers and IP addresses (kinds below)")
    email: bool = True
    phone: bool = True
    ip: bool = Field(True, description="IPv4 and IPv6 addresses")
    public_ips_only: bool = Field(
        True, description="replace only globally routable IPs (private, loopback and documentation ones are not PII)"
    )
    email_replacement: str = "email@example.com"
    phone_replacement: str = "+7 000 000 00 00"
    ipv4_replacement: str = "192.0.2.1"
    ipv6_replacement: str = "2001:db8::1"


# ------------------------------------------------------------------------------ patterns

# local part: ASCII (an address glued to a Cyrillic word still matches from its first ASCII letter);
# domain labels: any letters or digits, inner hyphens; top-level domain: letters only
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])"
    r"[A-Za-z0-9][A-Za-z0-9._%+\-]*@"
    r"(?:[^\W_](?:[\w\-]*[^\W_])?\.)+([^\W\d_]{2,})"
    r"(?![\w\-]|\.[^\W_])",
    re.IGNORECASE,
)
_NOT_TLD = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "tif", "tiff", "avif", "css", "js"})

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?=\d)(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\w|\.\d)")
# (each pattern starts with a lookahead for its first character: the scan is faster)
# candidates; ipaddress decides (a time such as 12:30:45 or a MAC address is no IPv6 address)
_IPV6 = re.compile(
    r"(?=[0-9A-Fa-f:])(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
    r"(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)"
)
# a dotted quad after one of these words is a version, revision or section number
_VERSION_BEFORE = re.compile(
    r"(?:\b(?:v|ver|version|versions|release|build|firmware|rev|revision|section|sections|"
    r"версия|версии|версию|версией|ревизия|редакция|релиз|сборка|сборки|пункт|пункта|пункте|"
    r"нұсқа\w*|тармақ\w*|бөлім\w*|п|§)\.?|§)\s*:?\s*$",
    re.IGNORECASE,
)

_PHONE = re.compile(
    r"""
    (?=[+(\d])(?<![\w+\-.,/@])
    (?:
        (?P<intl>\+\d{1,3}(?:[ .\-]?(?:\(\d{1,5}\)|\d{1,5})){1,6})
      | (?P<trunk>8[ \-]?(?:\(\d{3,5}\)|\d{3,5})[ \-]?\d{1,3}[ \-]?\d{2}[ \-]?\d{2})
      | (?P<area>\(\d{3,5}\)\ ?\d{1,3}-\d{2}-\d{2})
      | (?P<nanp>\([2-9]\d{2}\)\ ?[2-9]\d{2}-\d{4} | [2-9]\d{2}-[2-9]\d{2}-\d{4} | [2-9]\d{2}\.[2-9]\d{2}\.\d{4})
      | (?P<local>\d{3}-\d{2}-\d{2})
    )
    (?![\w\-]|[.,]\d)
    """,
    re.VERBOSE,
)
_DIGITS = re.compile(r"\d+")


def _phone_ok(m: re.Match[str]) -> bool:
    s = m.group()
    kind = m.lastgroup
    if kind == "intl":
        groups = _DIGITS.findall(s)
        n = sum(map(len, groups))
        if not 8 <= n <= 15:
            return False
        # "+1 500 000 000": a signed number grouped by thousands, not a phone
        if len(groups) >= 3 and all(len(g) == 3 for g in groups[1:]) and not any(c in s for c in "-()."):
            return False
        return True
    if kind == "trunk":
        n = sum(c.isdigit() for c in s)
        if n != 11:
            return False
        return not s.isdigit() or s[1] in "3456789"
    if kind == "area":
        return sum(c.isdigit() for c in s) == 10
    return True  # nanp, local: fixed shapes


# ------------------------------------------------------------------------------ redactor


class PIIRedactor:
    """:class:`PIIConfig` compiled: ``redactor(text) -> (text, {kind: matches replaced})``."""

    def __init__(self, cfg: PIIConfig):
        self.cfg = cfg
        self.kinds = tuple(k for k in PII_KINDS if cfg.enabled and getattr(cfg, k))
        self._steps: list[tuple[str, Callable[[str], tuple[str, int]]]] = []
        if "email" in self.kinds:
            self._steps.append(("email", self._emails))
        if "ip" in self.kinds:
            self._steps.append(("ip", self._ips))
        if "phone" in self.kinds:
            self._steps.append(("phone", self._phones))

    def __bool__(self) -> bool:
        return bool(self._steps)

    def __call__(self, text: str) -> tuple[str, dict[str, int]]:
        counts: dict[str, int] = {}
        for kind, step in self._steps:
            text, n = step(text)
            if n:
                counts[kind] = n
        return text, counts

    # each step: (new text, replacements); a text without the step's trigger character is not scanned

    def _emails(self, text: str) -> tuple[str, int]:
        if "@" not in text:
            return text, 0
        repl = self.cfg.email_replacement
        n = 0

        def sub(m: re.Match[str]) -> str:
            nonlocal n
            s = m.group()
            if s == repl or m.group(1).lower() in _NOT_TLD:
                return s
            n += 1
            return repl

        return _EMAIL.sub(sub, text), n

    def _ip_ok(self, s: str) -> bool:
        try:
            ip = ipaddress.ip_address(s)
        except ValueError:
            return False
        return ip.is_global or not self.cfg.public_ips_only

    def _ips(self, text: str) -> tuple[str, int]:
        n = 0
        if "::" in text or text.count(":") >= 2:
            v6 = self.cfg.ipv6_replacement

            def sub6(m: re.Match[str]) -> str:
                nonlocal n
                s = m.group()
                if s == v6 or not self._ip_ok(s):
                    return s
                n += 1
                return v6

            text = _IPV6.sub(sub6, text)
        if text.count(".") >= 3:
            v4 = self.cfg.ipv4_replacement

            def sub4(m: re.Match[str]) -> str:
                nonlocal n
                s = m.group()
                if s == v4 or not self._ip_ok(s):
                    return s
                line_start = text.rfind("\n", 0, m.start()) + 1
                if _VERSION_BEFORE.search(text, max(line_start, m.start() - 32), m.start()):
                    return s
                n += 1
                return v4

            text = _IPV4.sub(sub4, text)
        return text, n

    def _phones(self, text: str) -> tuple[str, int]:
        repl = self.cfg.phone_replacement
        n = 0

        def sub(m: re.Match[str]) -> str:
            nonlocal n
            s = m.group()
            if s == repl or not _phone_ok(m):
                return s
            n += 1
            return repl

        return _PHONE.sub(sub, text), n


def redact(text: str, cfg: PIIConfig | None = None) -> tuple[str, dict[str, int]]:
    """``text`` with its PII replaced, and the replacements by kind (kinds with none left out)."""
    return PIIRedactor(cfg or PIIConfig())(text)
