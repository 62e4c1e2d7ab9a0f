"""Is a mail from an agent's address really from the agent? Pure, but for DNS.

DESIGN.md 5 "Who is an agent": a mail from an address in ``agents:`` counts as the
agent's only when it carries trusted authentication, in one of two ways:

(b) an ``Authentication-Results`` header (RFC 8601) written by one of our own mail servers
    (its authserv-id is in ``[security] trusted_authserv_ids``) that says ``dkim=pass``
    for a domain aligned with the From domain, or ``spf=pass`` for an aligned
    ``smtp.mailfrom``;
(c) intake verified a DKIM signature itself (``[security] verify_dkim``) whose ``d=`` is
    aligned with the From domain, that signs the From header (RFC 6376 requires it,
    dkimpy's verifier does not check) and has no ``l=`` body length (with one, anyone can
    append text, mail commands included, to a replayed agent mail). Unaligned signatures
    are refused before any DNS lookup, and at most five are checked.

Rule (a) of the design (mail to a signed case/note address) is the caller's: the signed
address says *which case*, this module says *who*; both are needed.

**Where a header was written decides whether it is believed.** Anyone can write an
``Authentication-Results`` header claiming ``mx.example.com``: what the sender cannot do
is write *above* the ``Received`` header that our mail server prepends when it takes the
mail from the outside world (RFC 5321 4.4: trace headers are added at the top). So:

* The **boundary** is the topmost ``Received`` header that records a hand-over across the
  network, i.e. not a local hop, and it must be written by one of ``boundary_hosts`` (its
  ``by`` host). Local hops sit above the boundary and are walked past: a ``Received``
  with ``with LMTP`` (RFC 2033/3848: LMTP is how a local MTA delivers to a mail store or
  to intake's LMTP listener, never how the internet talks to an MX), ``with local``
  (Exim's local submission), or without a ``from`` clause (a local program's stamp, such
  as Postfix's pickup or Gmail's internal ``Received: by 2002:…``).
* The first network hop from the top must be ours. If it is not (an unknown host, an
  unreadable or ambiguous header) there is **no boundary**, and nothing is believed: we
  never walk further down, because everything below a hop we do not know may have been
  written by the sender, forged ``Received`` headers included.
* ``Authentication-Results`` headers **above** the boundary with a trusted authserv-id
  are believed; those **below** it are set aside and the fact is recorded, even when the
  authserv-id is ours (RFC 8601 5: they were added before the mail reached us).
* Direct-MX mode: intake's own SMTP listener prepends ``Received: from HELO ([IP]) by
  HOSTNAME (intake) with ESMTP``. That is a network hop by one of ``boundary_hosts``, so it
  is the boundary and every incoming ``Authentication-Results`` sits below it: ignored.
  When a mail server in front relays to intake, it must do so over LMTP (``[smtp]
  protocol = "lmtp"``), through ``intake ingest`` or through a mailbox intake polls: an
  SMTP hand-over into intake is taken for the edge of our site.

Some MTAs write their ``Authentication-Results`` just *below* their own ``Received``
(OpenDKIM inserts at position 1; Gmail does the same). Below the boundary a genuine
header cannot be told from one the sender put at the top of its mail, unless the MTA
deletes incoming ones that claim its authserv-id (RFC 8601 5 asks it to, many do not by
default), so such headers are set aside too; with those MTAs use ``verify_dkim``.

**Alignment** (DMARC's relaxed mode, RFC 7489 3.1, without a public-suffix list): a
domain is aligned with the From domain when it is equal to it, or one is a subdomain of
the other at a label boundary (``mail.example.co.jp`` ~ ``example.co.jp``). A single label
(``jp``) never aligns. Without a public-suffix list, ``d=co.jp`` would align with
``example.co.jp``; only the registry could publish such a key or SPF record. Sibling
subdomains (``a.example.com`` vs ``b.example.com``), which DMARC would align, do not: a
safe miss, not an opening.

Nothing here raises on malformed input: what cannot be read counts as not authenticated
and says why. The only I/O is the DNS lookup of DKIM keys, through ``dnsfunc``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from email.utils import getaddresses

import authres
import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from intake.mail.parse import ParsedMail

METHOD_DKIM = "dkim"
METHOD_SPF = "spf"
METHOD_DKIM_VERIFIED = "dkim-verified"

# A mail with thousands of trace or signature headers must not cost thousands of parses
# or DNS lookups: beyond these, headers are noted and not examined.
_MAX_AUTH_RESULTS = 20
# Our own servers write a few hundred characters; a longer one claiming to be theirs is not read.
_MAX_AUTH_RESULTS_CHARS = 16 * 1024
_MAX_SIGNATURES = 5
# LMTP variants (RFC 3848) and Exim's local submissions: hops inside the receiving site.
_LOCAL_PROTOCOLS = frozenset({"lmtp", "lmtps", "lmtpa", "lmtpsa", "local", "local-esmtp", "local-smtp",
                              "local-bsmtp"})
_RECEIVED_KEYWORDS = frozenset({"from", "by", "via", "with", "id", "for"})

# dkimpy logs every failed check at ERROR on its own logger; for a forged mail that is
# noise, and the reason is reported here anyway. A logger outside the logging tree, with
# a null handler, keeps it quiet without touching any global logging state.
_DKIM_LOG = logging.Logger("intake.mail.auth.dkimpy")
_DKIM_LOG.addHandler(logging.NullHandler())


@dataclass(frozen=True)
class Authentication:
    """Whether a mail is authenticated as coming from its From domain, and why (not)."""

    passed: bool
    method: str  # "dkim" | "spf" | "dkim-verified" | "" (none)
    domain: str  # the aligned domain that passed ("" when none)
    authserv_id: str  # whose Authentication-Results was believed ("" for none / our own verification)
    reason: str  # one line a person can read: why it passed, or why not and how to fix it
    ignored: tuple[str, ...]  # one line per Authentication-Results set aside, with why

    def as_dict(self) -> dict[str, object]:
        return {"passed": self.passed, "method": self.method, "domain": self.domain,
                "authserv_id": self.authserv_id, "reason": self.reason, "ignored": list(self.ignored)}


def authenticate(raw: bytes, mail: ParsedMail, *, trusted_authserv_ids: Collection[str],
                 boundary_hosts: Collection[str], verify_dkim: bool = False,
                 dnsfunc: Callable[..., bytes] | None = None) -> Authentication:
    """Decide whether ``mail`` (parsed from ``raw``) is authenticated for its From domain.

    ``trusted_authserv_ids`` is ``[security] trusted_authserv_ids``; ``boundary_hosts`` the
    hosts whose ``Received`` marks the edge of our site: the trusted authserv-ids plus the
    host name intake's SMTP listener writes into its ``Received`` header. ``verify_dkim``
    lets intake check DKIM signatures itself (looking keys up through ``dnsfunc``,
    dkimpy's resolver when ``None``), after the Authentication-Results found no pass.
    Never raises for malformed mail.
    """
    trusted = {_host(h) for h in trusted_authserv_ids} - {""}
    hosts = {_host(h) for h in boundary_hosts} - {""}

    from_domain, from_problem = _from_domain(mail)
    if from_problem:
        return Authentication(False, "", "", "", from_problem, ())

    ours = ", ".join(sorted(trusted)) or "our mail server"
    boundary = _find_boundary(mail.headers, hosts)
    believed, ignored = _sort_auth_results(mail.headers, trusted, boundary)

    found, seen = _aligned_pass(believed, from_domain)
    if found is not None:
        method, domain, authserv_id = found
        what = "dkim=pass" if method == METHOD_DKIM else "spf=pass (smtp.mailfrom)"
        return Authentication(True, method, domain, authserv_id,
                              f"{what} for {domain} from {authserv_id}, aligned with the From domain {from_domain}",
                              tuple(ignored))

    dkim_seen: list[str] = []
    if verify_dkim:
        verified, dkim_seen = _verify_dkim(raw, from_domain, dnsfunc)
        if verified is not None:
            return Authentication(True, METHOD_DKIM_VERIFIED, verified, "",
                                  f"intake verified a DKIM signature by {verified}, aligned with the From domain "
                                  f"{from_domain}", tuple(ignored))

    return Authentication(False, "", "", "", _failure(from_domain, ours, trusted, verify_dkim, boundary, believed,
                                                     seen, dkim_seen), tuple(ignored))


# --- the From domain ------------------------------------------------------------------------

def _from_domain(mail: ParsedMail) -> tuple[str, str]:
    """The one From domain, or ("", why there is none to authenticate)."""
    values = mail.header_all("From")
    # Decoded display names may hold commas ("山田, 花子"): only parts with an @ are addresses.
    count = len([a for _, a in getaddresses(values) if "@" in a])
    if mail.from_ is None or not mail.from_.domain:
        return "", "the mail has no readable From address, so it cannot be tied to an agent"
    # DKIM covers the bottom-most From, classification reads the top one: with two of them
    # a valid signature could vouch for an address other than the one shown.
    if len(values) != 1 or count != 1:
        return "", (f"the mail has {count} From addresses in {len(values)} From headers; mail from an agent "
                    "must name exactly one sender: send it again from your mail program unchanged")
    return _host(mail.from_.domain), ""


def _host(name: str) -> str:
    """A host or domain name as compared here: lower case, no dots at the ends, A-labels."""
    name = name.strip().strip(".").lower()
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:  # not a valid IDN: compared as written, so it matches nothing real
        return name


def aligned(domain: str, from_domain: str) -> bool:
    """Relaxed alignment without a public-suffix list: equal, or one a subdomain of the other.

    A single-label domain (a top-level domain) never aligns.
    """
    a, b = _host(domain), _host(from_domain)
    if not a or not b:
        return False
    if a == b:
        return True
    shorter, longer = sorted((a, b), key=len)
    return "." in shorter and longer.endswith("." + shorter)


# --- the trust boundary -----------------------------------------------------------------------

@dataclass(frozen=True)
class _Boundary:
    index: int | None  # position in mail.headers of the boundary Received; None: believe nothing
    host: str  # its by-host
    why_none: str  # when there is none: what was found instead


@dataclass(frozen=True)
class _Hop:
    by: str
    local: bool


def _find_boundary(headers: Sequence[tuple[str, str]], hosts: Collection[str]) -> _Boundary:
    """The topmost network ``Received``, if one of ours wrote it (see the module docstring)."""
    for index, (name, value) in enumerate(headers):
        if name.lower() != "received":
            continue
        hop = _read_received(value)
        if hop is None:
            return _Boundary(None, "", f"the newest network Received header cannot be read safely "
                                       f"({_short(value)})")
        if hop.local:
            continue
        if hop.by in hosts:
            return _Boundary(index, hop.by, "")
        return _Boundary(None, "", f"the mail entered through {hop.by}, which is neither a trusted "
                                   "authserv-id nor intake's own SMTP host")
    return _Boundary(None, "", "the mail has no Received header from our mail servers")


def _read_received(value: str) -> _Hop | None:
    """The ``by`` host of a Received header and whether it is a local hop; None if unsafe.

    Not a full RFC 5321 parser: it reads only headers our own servers wrote, and only the
    ``from``/``by``/``with`` keywords. The HELO name a client gives is copied into the
    ``from`` clause and may hold spaces, parentheses or keywords (``EHLO x by host with
    LMTP``); any header where the keywords are not unique and in order, or the comments do
    not balance, is unreadable, which makes it believe nothing rather than the wrong thing.
    """
    stamp = value.rpartition(";")[0] if ";" in value else value  # the date follows the last ";"
    text = _without_comments(stamp)
    if text is None:
        return None
    tokens = text.split()
    words = [t.lower() for t in tokens]
    if words.count("by") > 1 or words.count("with") > 1 or words.count("from") > 1:
        return None
    has_from = "from" in words
    if has_from and words[0] != "from":
        return None
    if "by" not in words:
        # Only comments, such as qmail's "(qmail 123 invoked by uid 89)": a local program.
        return _Hop("", local=True) if not has_from else None
    at = words.index("by")
    if at + 1 >= len(tokens) or words[at + 1] in _RECEIVED_KEYWORDS:
        return None
    protocol = ""
    if "with" in words:
        w = words.index("with")
        if w < at or w + 1 >= len(tokens):
            return None
        protocol = words[w + 1]
    return _Hop(_host(tokens[at + 1]), local=not has_from or protocol in _LOCAL_PROTOCOLS)


def _without_comments(text: str) -> str | None:
    """``text`` with its (nested) RFC 5322 comments blanked out; None when they do not balance."""
    out: list[str] = []
    depth = 0
    escaped = False
    for ch in text:
        if depth:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if not depth:
                    out.append(" ")
            continue
        if ch == "(":
            depth = 1
        elif ch == ")":
            return None
        else:
            out.append(ch)
    return None if depth else "".join(out)


# --- Authentication-Results -------------------------------------------------------------------

@dataclass(frozen=True)
class _Believed:
    authserv_id: str
    results: tuple[tuple[str, str, tuple[tuple[str, str, str], ...]], ...]  # (method, result, properties)


def _sort_auth_results(headers: Sequence[tuple[str, str]], trusted: Collection[str],
                       boundary: _Boundary) -> tuple[list[_Believed], list[str]]:
    """Split the Authentication-Results headers into believed ones and (reasons for) the rest."""
    believed: list[_Believed] = []
    ignored: list[str] = []
    examined = 0
    skipped = 0
    for index, (name, value) in enumerate(headers):
        if name.lower() != "authentication-results":
            continue
        if examined >= _MAX_AUTH_RESULTS:
            skipped += 1
            continue
        examined += 1
        label = f"Authentication-Results {_short(value)}"
        # Where a header sits and whose it claims to be decide first: only a header that
        # could be believed is parsed (authres grows faster than linearly with its input).
        aid = _claimed_authserv_id(value)
        if aid not in trusted:
            ignored.append(f"{label}: authserv-id {aid or '(none)'} is not in [security] trusted_authserv_ids")
            continue
        if boundary.index is None:
            ignored.append(f"{label}: claims {aid}, but {boundary.why_none}, so none can be told "
                           "apart from one the sender wrote")
            continue
        if index > boundary.index:
            ignored.append(f"{label}: claims {aid}, but sits below the Received header by {boundary.host} "
                           "(our boundary), so it was written before the mail reached our mail server: "
                           "forged by the sender or added by an earlier hop")
            continue
        parsed = _parse_auth_results(value) if len(value) <= _MAX_AUTH_RESULTS_CHARS else \
            f"longer than {_MAX_AUTH_RESULTS_CHARS:,} characters"
        if isinstance(parsed, str):
            ignored.append(f"{label}: unreadable ({parsed})")
        elif _host(parsed.authserv_id) != aid:
            ignored.append(f"{label}: unreadable (authserv-id read as {parsed.authserv_id})")
        else:
            believed.append(parsed)
    if skipped:
        ignored.append(f"{skipped} more Authentication-Results headers not examined (more than "
                       f"{_MAX_AUTH_RESULTS})")
    return believed, ignored


_LEADING_COMMENTS = re.compile(r"^\s*(?:\([^()]*\)\s*)*")


def _claimed_authserv_id(value: str) -> str:
    """The authserv-id a header names (RFC 8601: first, before the first ``;``), read
    without parsing the rest."""
    head = _LEADING_COMMENTS.sub("", value[:1024]).split(";", 1)[0].split()
    return _host(head[0]) if head else ""


def _parse_auth_results(value: str) -> _Believed | str:
    """One header value through authres; the error text when it cannot be read."""
    try:
        header = authres.parse_value(value)
        results = tuple(
            (str(r.method).lower(), str(r.result or "").lower(),
             tuple((str(p.type).lower(), str(p.name).lower(), str(p.value or "")) for p in r.properties))
            for r in header.results)
        return _Believed(str(header.authserv_id or "").lower(), results)
    except Exception as exc:  # noqa: BLE001 - authres raises its own errors and, on odd input, others
        return " ".join(str(exc).split())[:120] or type(exc).__name__


def _prop(properties: tuple[tuple[str, str, str], ...], ptype: str, name: str) -> str:
    return next((v for t, n, v in properties if t == ptype and n == name and v), "")


def _domain_of(value: str) -> str:
    """``hanako@example.com``, ``@example.com`` or ``example.com`` → ``example.com``."""
    return _host(value.rpartition("@")[2]) if value else ""


def _aligned_pass(believed: Sequence[_Believed], from_domain: str) -> tuple[tuple[str, str, str] | None, list[str]]:
    """(method, domain, authserv-id) of the first aligned pass, DKIM before SPF, and what was seen.

    DKIM is preferred because it vouches for the content; SPF only for the sending host.
    """
    seen: list[str] = []
    spf: tuple[str, str, str] | None = None
    for header in believed:
        for method, result, props in header.results:
            if method == METHOD_DKIM:
                domain = _host(_prop(props, "header", "d")) or _domain_of(_prop(props, "header", "i"))
            elif method == METHOD_SPF:
                domain = _domain_of(_prop(props, "smtp", "mailfrom"))
            else:
                continue
            what = f"{method}={result}" + (f" for {domain}" if domain else "")
            if result == "pass" and aligned(domain, from_domain):
                if method == METHOD_DKIM:
                    return (METHOD_DKIM, domain, header.authserv_id), seen
                spf = spf or (METHOD_SPF, domain, header.authserv_id)
            elif result == "pass":
                seen.append(f"{what}, not aligned with {from_domain}")
            else:
                seen.append(what)
    return spf, seen


# --- intake's own DKIM verification -----------------------------------------------------------

class _KeyLookup:
    """Wraps the DNS lookup to tell a missing or unusable key from a bad signature (dkimpy
    returns False for all three)."""

    def __init__(self, dnsfunc: Callable[..., bytes] | None) -> None:
        self._dnsfunc = dnsfunc if dnsfunc is not None else dkim.get_txt
        self.name = ""
        self.found = False
        self.error = ""  # the lookup itself failed
        self.unusable = ""  # a record came back, but dkimpy cannot use it as a key

    def __call__(self, name: bytes, timeout: int = 5) -> bytes | None:
        self.name = name.decode("ascii", "replace").rstrip(".") if isinstance(name, bytes) else str(name)
        try:
            record = self._dnsfunc(name, timeout=timeout)
        except Exception as exc:
            self.error = " ".join(str(exc).split())[:120] or type(exc).__name__
            raise
        self.found = bool(record)
        if record:
            try:
                dkim.evaluate_pk(name, record)
            except Exception as exc:  # noqa: BLE001 - dkimpy reads the record again and returns False
                self.unusable = _first_line(exc)
        return record


def _verify_dkim(raw: bytes, from_domain: str, dnsfunc: Callable[..., bytes] | None) -> tuple[str | None, list[str]]:
    """The aligned ``d=`` of the first valid DKIM signature, else None and what went wrong."""
    try:
        checker = dkim.DKIM(raw, logger=_DKIM_LOG)
    except Exception as exc:  # noqa: BLE001 - dkimpy's header parser raises on broken mail
        return None, [f"the mail cannot be read for DKIM ({_first_line(exc)})"]
    signatures = [v for k, v in checker.headers if k.lower() == b"dkim-signature"]
    if not signatures:
        return None, ["the mail has no DKIM-Signature"]
    seen: list[str] = []
    for idx, value in enumerate(signatures[:_MAX_SIGNATURES]):
        try:
            tags = parse_tag_value(value)
        except (InvalidTagValueList, ValueError) as exc:
            seen.append(f"a DKIM-Signature cannot be read ({_first_line(exc)})")
            continue
        domain = _host(tags.get(b"d", b"").decode("utf-8", "replace"))
        signed = [h.strip().lower() for h in tags.get(b"h", b"").split(b":")]
        # Cheap refusals first: no DNS lookup for a signature that could not count anyway.
        if not aligned(domain, from_domain):
            seen.append(f"a DKIM signature by {domain or '(no d=)'} is not aligned with {from_domain}")
            continue
        if b"from" not in signed:
            seen.append(f"the DKIM signature by {domain} does not cover the From header")
            continue
        if b"l" in tags:
            # l= lets anyone append to a signed body: a replayed agent mail with added text.
            seen.append(f"the DKIM signature by {domain} covers only part of the body (l=)")
            continue
        lookup = _KeyLookup(dnsfunc)
        try:
            valid = checker.verify(idx=idx, dnsfunc=lookup)
        except dkim.DKIMException as exc:
            problem = _first_line(exc)
            if "body hash mismatch" in problem:
                seen.append(f"the body was changed after {domain} signed it")
            else:
                seen.append(f"the DKIM signature by {domain} is not accepted ({problem})")
            continue
        except Exception as exc:  # noqa: BLE001 - a resolver error is a failed check, not a crash
            seen.append(f"the DKIM key of {domain} could not be looked up ({lookup.error or _first_line(exc)})")
            continue
        if valid:
            return domain, seen
        if lookup.error:
            seen.append(f"the DKIM key of {domain} could not be looked up ({lookup.error})")
        elif lookup.unusable:
            seen.append(f"the DKIM key of {domain} at {lookup.name} is unusable ({lookup.unusable})")
        elif not lookup.found:
            seen.append(f"no usable DKIM key for {domain} at {lookup.name or 'its selector'}")
        else:
            seen.append(f"the DKIM signature by {domain} does not match the mail (changed after signing, "
                        "or forged)")
    if len(signatures) > _MAX_SIGNATURES:
        seen.append(f"{len(signatures) - _MAX_SIGNATURES} more DKIM signatures not checked")
    return None, seen


# --- the reason a person reads ----------------------------------------------------------------

def _failure(from_domain: str, ours: str, trusted: Collection[str], verify_dkim: bool, boundary: _Boundary,
             believed: Sequence[_Believed], seen: Sequence[str], dkim_seen: Sequence[str]) -> str:
    """One line: what was missing and what the agent (or the administrator) can do."""
    fix = (f"send from your {from_domain} mail account through the company mail server, which signs your mail "
           "(not from another address, service or forwarding rule)")
    if not trusted and not verify_dkim:
        return ("intake is not set up to authenticate agents ([security] trusted_authserv_ids is empty and "
                "verify_dkim is off): ask an administrator to configure one of them")
    parts: list[str] = []
    if trusted:
        if boundary.index is None:
            parts.append(f"no Authentication-Results could be believed because {boundary.why_none}")
        elif seen:
            parts.append(f"no Authentication-Results from {ours} (our mail server) passed DKIM or SPF for "
                         f"{from_domain} (seen: {'; '.join(seen[:4])})")
        elif believed:
            parts.append(f"the Authentication-Results from {ours} (our mail server) report neither DKIM nor SPF "
                         f"for {from_domain}")
        else:
            parts.append(f"no Authentication-Results from {ours} (our mail server) vouch for {from_domain}")
    if verify_dkim:
        parts.append(f"intake's own DKIM check failed: {'; '.join(dkim_seen[:4]) or 'nothing to check'}")
    return "; ".join(parts) + ": " + fix


def _short(value: str, limit: int = 80) -> str:
    """A header value on one line, shortened for a log or reason line."""
    text = " ".join(value.split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:120] or type(exc).__name__
