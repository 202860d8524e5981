"""Normalisers: decide whether two values mean the same thing. They never rewrite stored data.

Each normaliser has a scalar form and a Series form; the Series form works on unique values
only, so the expensive one (phone, ~13 µs a value) is paid once per distinct value.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pandas as pd
import phonenumbers

_WS = re.compile(r"\s+")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_PHONE_FORMATTING = re.compile(r"[\s\-.()/]")


def normalise_text(value: str | None) -> str:
    """Trim and collapse runs of whitespace; case is significant."""
    if value is None:
        return ""
    return _WS.sub(" ", str(value)).strip()


def normalise_exact(value: str | None) -> str:
    return "" if value is None else str(value)


def normalise_email(value: str | None) -> str:
    """Trimmed and case-folded (mailbox case is not significant in practice)."""
    return normalise_text(value).casefold()


def normalise_website(value: str | None) -> str:
    """Compare websites by host and path.

    Decisions: the scheme is dropped (http and https name the same site for a CRM user), the
    host is lower-cased and a leading `www.` is dropped, the path keeps its case (paths are
    case-sensitive) and trailing slashes are dropped. `Example.com/` == `https://example.com`.
    """
    text = normalise_text(value)
    if not text:
        return ""
    text = _SCHEME.sub("", text)
    cut = len(text)
    for sep in "/?#":
        pos = text.find(sep)
        if pos != -1:
            cut = min(cut, pos)
    host, rest = text[:cut].lower().rstrip("."), text[cut:]
    if host.startswith("www."):
        host = host[4:]
    return host + rest.rstrip("/")


# Fast path for the common UK shapes, e.g. `020 7946 0000`, `+44 (20) 7946-0000`: ASCII digits
# and plain separators only, `+44` or the national prefix `0`, then a 10-digit national number
# starting 1-3, 5, 7-9. phonenumbers (~13 µs a value) returns `+44` + those 10 digits for all of
# them (GB's general pattern is `[1-357-9]\d{9}|...`, national prefix `0`); tests/test_mapping.py
# checks the two agree. Anything else (`+44 (0)20 ...`, extensions, letters, other regions) still
# goes through phonenumbers.
_FAST_SEPARATORS = re.compile(r"[ \-.()/]")
_FAST_GB = re.compile(r"(?:\+44|0)([1-357-9][0-9]{9})")


def _fast_phone(text: str, region: str) -> str | None:
    if region != "GB" or len(text) > 40:
        return None
    match = _FAST_GB.fullmatch(_FAST_SEPARATORS.sub("", text))
    return None if match is None else "+44" + match.group(1)


def normalise_phone(value: str | None, region: str = "GB") -> str:
    """E.164 when `phonenumbers` can parse it (national numbers read in `region`), else text."""
    text = normalise_text(value)
    if not text:
        return ""
    fast = _fast_phone(text, region)
    if fast is not None:
        return fast
    try:
        parsed = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return text
    formatted = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    if parsed.extension:
        formatted += f";ext={parsed.extension}"
    return formatted


def scalar_normaliser(kind: str, region: str = "GB") -> Callable[[str | None], str]:
    if kind in ("text", "name"):
        return normalise_text
    if kind == "email":
        return normalise_email
    if kind == "website":
        return normalise_website
    if kind == "exact":
        return normalise_exact
    if kind == "phone":
        return lambda v: normalise_phone(v, region)
    raise ValueError(f"unknown normaliser {kind!r}")


def normalise(kind: str, value: str | None, region: str = "GB") -> str:
    return scalar_normaliser(kind, region)(value)


def normalise_series(kind: str, values: pd.Series, region: str = "GB") -> pd.Series:
    """Normalise a Series of strings (NULL -> ''), computing each distinct value once."""
    values = values.fillna("").astype(object)
    if kind in ("text", "name", "email"):
        out = values.str.replace(_WS, " ", regex=True).str.strip()
        return out.str.casefold() if kind == "email" else out
    if kind == "exact":
        return values
    func = scalar_normaliser(kind, region)
    uniques = pd.unique(values)
    lookup = {u: func(u) for u in uniques}
    return values.map(lookup)


def phone_digits(values: pd.Series) -> pd.Series:
    """Cheap pre-check for phones: two values equal here are the same number for sure."""
    return values.fillna("").astype(object).str.replace(_PHONE_FORMATTING, "", regex=True)
