"""RFC 9110 (HTTP Semantics): reading a ``Retry-After`` header (section 10.2.3).

Pure functions: no I/O, no clock of their own (the caller passes ``now``). Only the header is
read, never a response body: the body is untrusted free text.
"""

from __future__ import annotations

import calendar
import datetime
import re

#: RFC 9110 section 1.2: a delta-seconds value larger than can be represented is taken as 2**31.
MAX_DELTA_SECONDS = 2**31

# Section 10.2.3: Retry-After = HTTP-date / delay-seconds; delay-seconds = 1*DIGIT (ASCII only).
_DELTA = re.compile(r"[0-9]+")
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
_MONTH = "(?P<month>" + "|".join(_MONTHS) + ")"
_TIME = r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})"
# Section 5.6.7: IMF-fixdate, and the obsolete rfc850-date and asctime-date a recipient must
# also accept. Day names are not checked against the date (the date is what counts).
_IMF_FIXDATE = re.compile(
    rf"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (?P<day>[0-9]{{2}}) {_MONTH} (?P<year>[0-9]{{4}}) {_TIME} GMT"
)
_RFC850_DATE = re.compile(
    r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), "
    rf"(?P<day>[0-9]{{2}})-{_MONTH}-(?P<year>[0-9]{{2}}) {_TIME} GMT"
)
_ASCTIME_DATE = re.compile(
    rf"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) {_MONTH} (?P<day>[0-9]{{2}}| [0-9]) {_TIME} (?P<year>[0-9]{{4}})"
)


def http_date(value: str, now: float) -> float | None:
    """An HTTP-date (section 5.6.7) as POSIX seconds, or None when it is not one. ``now`` (POSIX
    seconds) places an rfc850-date's two-digit year: one more than 50 years ahead is taken as
    the most recent past year with the same last two digits."""
    text = value.strip(" \t")
    for pattern in (_IMF_FIXDATE, _RFC850_DATE, _ASCTIME_DATE):
        match = pattern.fullmatch(text)
        if match is not None:
            break
    else:
        return None
    year = int(match["year"])
    if pattern is _RFC850_DATE:
        this_year = datetime.datetime.fromtimestamp(now, datetime.UTC).year
        year += this_year - this_year % 100
        if year > this_year + 50:
            year -= 100
    try:
        moment = datetime.datetime(
            year,
            _MONTHS[match["month"]],
            int(match["day"]),
            int(match["hour"]),
            int(match["minute"]),
            int(match["second"]),
        )
    except ValueError:  # 31 February, hour 99, ...
        return None
    return float(calendar.timegm(moment.timetuple()))


def retry_after_seconds(value: str | None, date: str | None, now: float) -> float | None:
    """How many seconds a ``Retry-After`` header asks the client to wait, or None when there is
    none, it is malformed, negative, or a date already past.

    A delta-seconds value is taken as is (saturating at 2**31, section 1.2). An HTTP-date is
    measured from the answer's own ``Date`` header when that is a valid HTTP-date, so a server
    whose clock is off by minutes still gets the wait it meant; else from ``now`` (POSIX
    seconds, the broker's wall clock). No upper bound is applied here: that is the caller's
    policy (broker/lifecycle.py)."""
    if value is None:
        return None
    text = value.strip(" \t")
    if _DELTA.fullmatch(text):
        # Compare the digit count first: int() refuses strings beyond ~4300 digits.
        if len(text.lstrip("0")) > len(str(MAX_DELTA_SECONDS)):
            return float(MAX_DELTA_SECONDS)
        return float(min(int(text), MAX_DELTA_SECONDS))
    at = http_date(text, now)
    if at is None:
        return None
    reference = http_date(date, now) if date is not None else None
    wait = at - (reference if reference is not None else now)
    return wait if wait >= 0 else None
