"""Agent authentication (DESIGN.md 5 "Who is an agent"): which Authentication-Results are
believed, alignment with the From domain, and intake's own DKIM check.

What an attacker can and cannot write. The sender controls every byte of a mail as it
reaches our mail server, so it can put anything at the top of its headers: an
``Authentication-Results: mx.example.com; dkim=pass …`` or a ``Received: … by
mx.example.com`` naming our servers. What it cannot do is write *above* the ``Received``
header our server prepends when it takes the mail (RFC 5321 4.4), nor above what our side
writes after that. ``_delivered_by_our_mx`` and ``_delivered_by_intake`` below do exactly
what our MTA and intake's SMTP listener do: prepend to the sender's bytes. So a forged header
"above our Received" cannot be produced by a sender: every forged header in these tests is
written by the sender and ends up below.

Every mail here is written by hand. DNS is the one test double: a function returning the
TXT record of a key generated in the test.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from email.header import Header

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from intake.mail.auth import Authentication, aligned, authenticate
from intake.mail.parse import parse

OUR_MX = "mx.example.com"
INTAKE_HOST = "intake.example.com"

HANAKO = f"{Header('山田 花子', 'utf-8').encode()} <hanako@example.com>"
SUBJECT = Header("Re: [CASE-1042] 請求書の再発行について", "utf-8").encode()


def _crlf(*blocks: str) -> bytes:
    """Header lines written here with \\n, as on the wire (CRLF); empty blocks drop out."""
    text = "\n".join(b.strip("\n") for b in blocks if b.strip("\n"))
    return text.replace("\n", "\r\n").encode("utf-8") + b"\r\n"


def _sent(*, from_: str = HANAKO, top: str = "", body: str = "お世話になっております。\n再発行しました。\n") -> bytes:
    """A mail as the sender's program hands it over; ``top`` is what the sender puts first."""
    head = f"""
From: {from_}
To: support@example.com
Subject: {SUBJECT}
Date: Tue, 3 Feb 2026 09:59:58 +0900
Message-ID: <20260203095958.4f1c@example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit
"""
    return _crlf(top, head) + b"\r\n" + body.replace("\n", "\r\n").encode("utf-8")


def _received_by_mx(helo: str = "smtp.example.com", ip: str = "192.0.2.10") -> str:
    return f"""
Received: from {helo} ({helo} [{ip}])
\tby mx.example.com (Postfix) with ESMTPS id 4R2xQk0fGz
\tfor <support@example.com>; Tue,  3 Feb 2026 10:00:02 +0900 (JST)
"""


def _delivered_by_our_mx(sent: bytes, results: str = "", *, helo: str = "smtp.example.com",
                         ip: str = "192.0.2.10") -> bytes:
    """What our Postfix does on arrival: its Authentication-Results and Received on top (RFC 8601's
    placement, above its own Received)."""
    return _crlf(results, _received_by_mx(helo, ip)) + sent


def _intake_received(protocol: str, helo: str = "mx.example.com", ip: str = "10.0.0.5") -> str:
    """The Received header intake's own listener writes (``SmtpHandler._trace``)."""
    return (f"Received: from {helo} ([{ip}])\n\tby {INTAKE_HOST} (intake) with {protocol}\n"
            "\tfor <support@example.com>; Tue, 03 Feb 2026 10:00:03 +0900")


def _delivered_by_intake(mail: bytes, protocol: str = "ESMTP", helo: str = "smtp.example.com",
                         ip: str = "192.0.2.10") -> bytes:
    return _crlf("Return-Path: <hanako@example.com>", _intake_received(protocol, helo, ip)) + mail


def _auth(raw: bytes, *, trusted: tuple[str, ...] = (OUR_MX,), hosts: tuple[str, ...] | None = None,
          verify_dkim: bool = False, dnsfunc: Callable[..., bytes] | None = None) -> Authentication:
    return authenticate(raw, parse(raw), trusted_authserv_ids=trusted,
                        boundary_hosts=hosts if hosts is not None else (*trusted, INTAKE_HOST),
                        verify_dkim=verify_dkim, dnsfunc=dnsfunc)


# Postfix with OpenDKIM, as RFC 8601 places it: above the MTA's own Received.
OPENDKIM_PASS = """
Authentication-Results: mx.example.com;
\tdkim=pass (2048-bit key; unprotected) header.d=example.com header.i=@example.com
\theader.a=rsa-sha256 header.s=mail2026 header.b="Qk9vY2Fu";
\tdkim-atps=neutral
"""


# --- (b) Authentication-Results from our own mail server ----------------------------------

def test_postfix_opendkim_dkim_pass_aligned_passes() -> None:
    result = _auth(_delivered_by_our_mx(_sent(), OPENDKIM_PASS))
    assert result.passed
    assert (result.method, result.domain, result.authserv_id) == ("dkim", "example.com", OUR_MX)
    assert result.ignored == ()
    assert "dkim=pass" in result.reason and "example.com" in result.reason


def test_gmail_style_results_name_the_domain_in_header_i() -> None:
    # Gmail's form: header.i=@domain without header.d, an SPF comment full of colons, dmarc.
    # The mailbox is polled over IMAP; the topmost Received is Gmail's internal hop without a
    # from clause, which is walked past as local.
    raw = _crlf("""
Received: by 2002:a05:7300:5b8a:b0:1a1:9f0e:3c2d with SMTP id x9csp1234567dyb;
        Tue, 3 Feb 2026 01:00:04 -0800 (PST)
Authentication-Results: mx.google.com;
       dkim=pass header.i=@example.co.jp header.s=s2026 header.b=Zx81Qp0a;
       spf=pass (google.com: domain of hanako@example.co.jp designates 192.0.2.25 as permitted sender) smtp.mailfrom=hanako@example.co.jp;
       dmarc=pass (p=QUARANTINE sp=QUARANTINE dis=NONE) header.from=example.co.jp
Received: from smtp.example.co.jp (smtp.example.co.jp. [192.0.2.25])
        by mx.google.com with ESMTPS id a640c23a62f3a-ab6c9f07bb1si1234567866b.1.2026.02.03.01.00.03
        for <support@example.com>
        (version=TLS1_3 cipher=TLS_AES_256_GCM_SHA384 bits=256/256);
        Tue, 03 Feb 2026 01:00:03 -0800 (PST)
""") + _sent(from_="Hanako Yamada <hanako@example.co.jp>")
    result = _auth(raw, trusted=("mx.google.com",))
    assert result.passed
    assert (result.method, result.domain, result.authserv_id) == ("dkim", "example.co.jp", "mx.google.com")


def test_results_below_the_servers_own_received_are_set_aside() -> None:
    # Gmail and OpenDKIM (which inserts at position 1) write their header just *below* their
    # own Received. There it cannot be told from one the sender put at the top of its mail,
    # so it is not believed; intake's own DKIM check (verify_dkim) is the way for such MTAs.
    raw = _crlf(_received_by_mx()) + _crlf(OPENDKIM_PASS) + _sent()
    result = _auth(raw)
    assert not result.passed
    assert len(result.ignored) == 1
    assert "below the Received header by mx.example.com" in result.ignored[0]


def test_dkim_pass_for_a_third_party_domain_does_not_pass() -> None:
    # Sent through a bulk-mail service that signs with its own domain: DKIM passes, but for
    # the service, not for the agent's company.
    results = """
Authentication-Results: mx.example.com;
\tdkim=pass header.d=mailer.example.net header.s=k1 header.b=aGVsbG8;
\tspf=pass smtp.mailfrom=bounces+123@mailer.example.net
"""
    result = _auth(_delivered_by_our_mx(_sent(), results))
    assert not result.passed
    assert result.method == "" and result.domain == "" and result.authserv_id == ""
    assert "dkim=pass for mailer.example.net, not aligned with example.com" in result.reason
    assert "spf=pass for mailer.example.net, not aligned" in result.reason
    assert "send from your example.com mail account" in result.reason


def test_spf_pass_aligned_passes() -> None:
    results = """
Authentication-Results: mx.example.com;
\tdkim=none;
\tspf=pass (sender SPF authorized) smtp.mailfrom=hanako@example.com (client-ip=192.0.2.10)
"""
    result = _auth(_delivered_by_our_mx(_sent(), results))
    assert result.passed
    assert (result.method, result.domain, result.authserv_id) == ("spf", "example.com", OUR_MX)


@pytest.mark.parametrize("outcome", ["softfail", "fail", "neutral", "temperror"])
def test_spf_other_than_pass_does_not_pass(outcome: str) -> None:
    results = f"Authentication-Results: mx.example.com; spf={outcome} smtp.mailfrom=hanako@example.com"
    result = _auth(_delivered_by_our_mx(_sent(), results))
    assert not result.passed
    assert f"spf={outcome} for example.com" in result.reason


def test_dkim_is_preferred_to_spf_when_both_pass() -> None:
    results = """
Authentication-Results: mx.example.com; spf=pass smtp.mailfrom=example.com;
\tdkim=pass header.d=example.com
"""
    assert _auth(_delivered_by_our_mx(_sent(), results)).method == "dkim"


def test_subdomain_signer_is_aligned() -> None:
    results = "Authentication-Results: mx.example.com; dkim=pass header.d=mail.example.com"
    result = _auth(_delivered_by_our_mx(_sent(), results))
    assert result.passed and result.domain == "mail.example.com"


@pytest.mark.parametrize("domain, from_domain, expected", [
    ("example.com", "example.com", True),
    ("EXAMPLE.com.", "example.com", True),
    ("mail.example.com", "example.com", True),  # a subdomain signs for the parent
    ("example.co.jp", "support.example.co.jp", True),  # the parent signs for a subdomain
    ("a.example.com", "b.example.com", False),  # siblings: DMARC would align them, we do not
    ("notexample.com", "example.com", False),  # a suffix, not at a label boundary
    ("com", "example.com", False),  # a single label never aligns
    ("jp", "example.jp", False),
    ("", "example.com", False),
    ("例え.jp", "xn--r8jz45g.jp", True),  # IDN: compared as A-labels
])
def test_alignment(domain: str, from_domain: str, expected: bool) -> None:
    assert aligned(domain, from_domain) is expected


def test_untrusted_authserv_id_is_ignored() -> None:
    # The sender's own server (or the sender) vouches for itself: not our server, not believed.
    sent = _sent(top="Authentication-Results: mx.attacker.example; dkim=pass header.d=example.com")
    result = _auth(_delivered_by_our_mx(sent, "Authentication-Results: mx.example.com; dkim=none",
                                        helo="mx.attacker.example", ip="203.0.113.66"))
    assert not result.passed
    assert len(result.ignored) == 1
    assert "mx.attacker.example is not in [security] trusted_authserv_ids" in result.ignored[0]


def test_forged_results_claiming_our_server_are_ignored_and_recorded() -> None:
    # The attacker writes, at the very top of its mail, what our server would write for a
    # genuine agent mail, down to a fake Received by our MX to pose as the boundary.
    forged = """
Authentication-Results: mx.example.com; dkim=pass header.d=example.com; spf=pass smtp.mailfrom=example.com
Received: from smtp.example.com (smtp.example.com [192.0.2.10])
\tby mx.example.com (Postfix) with ESMTPS id 4R2xAAAAAA; Tue,  3 Feb 2026 09:59:59 +0900 (JST)
"""
    sent = _sent(top=forged)
    # Our server finds no signature and the attacker's IP outside example.com's SPF.
    genuine = "Authentication-Results: mx.example.com; dkim=none; spf=fail smtp.mailfrom=example.com"
    raw = _delivered_by_our_mx(sent, genuine, helo="smtp.example.com", ip="203.0.113.66")
    result = _auth(raw)
    assert not result.passed
    assert len(result.ignored) == 1
    assert "claims mx.example.com, but sits below the Received header by mx.example.com" in result.ignored[0]
    assert "spf=fail for example.com" in result.reason
    # The forged header is placed first by the sender and still ends up below our Received:
    # no sender can produce a forged header above it.
    names = [name.lower() for name, _ in parse(raw).headers]
    assert names[:3] == ["authentication-results", "received", "authentication-results"]


def test_forged_results_with_no_genuine_ones() -> None:
    # An MTA that adds nothing for unsigned mail (OpenDKIM's default): only the forgery is left.
    sent = _sent(top="Authentication-Results: mx.example.com; dkim=pass header.d=example.com")
    result = _auth(_delivered_by_our_mx(sent, ip="203.0.113.66"))
    assert not result.passed
    assert "below the Received header by mx.example.com" in result.ignored[0]
    assert "no Authentication-Results from mx.example.com (our mail server) vouch for example.com" in result.reason


def test_several_results_headers_from_several_filters() -> None:
    # OpenDMARC, OpenDKIM and an SPF policy daemon each add their own header; a spam filter
    # that is not a trusted authserv-id adds one too.
    results = """
Authentication-Results: spamfilter.example.com; dkim=pass header.d=example.com
Authentication-Results: mx.example.com; dmarc=pass (p=none dis=none) header.from=example.com
Authentication-Results: mx.example.com; dkim=fail (bad signature) header.d=example.com
Authentication-Results: mx.example.com; spf=pass smtp.mailfrom=hanako@example.com
"""
    result = _auth(_delivered_by_our_mx(_sent(), results))
    assert result.passed and result.method == "spf"
    assert len(result.ignored) == 1 and "spamfilter.example.com" in result.ignored[0]


def test_a_failed_result_does_not_hide_a_later_pass() -> None:
    results = """
Authentication-Results: mx.example.com; dkim=fail header.d=example.com header.s=old
Authentication-Results: mx.example.com; dkim=pass header.d=example.com header.s=mail2026
"""
    assert _auth(_delivered_by_our_mx(_sent(), results)).passed


@pytest.mark.parametrize("value", [
    "",
    ";;;",
    "mx.example.com (unclosed comment; dkim=pass header.d=example.com",
    "mx.example.com; dkim=pass header.d=example.com, spf=pass",
    # Microsoft 365 writes no authserv-id at all.
    "spf=pass (sender IP is 192.0.2.10) smtp.mailfrom=example.com; dkim=pass (signature was verified) "
    "header.d=example.com;dmarc=pass action=none header.from=example.com;compauth=pass reason=100",
    "mx.example.com 2; dkim=pass header.d=example.com",
    "mx.example.com; dkim=pass header.d=\"example.com",
    "mx.example.com; \x00\x01 dkim=pass",
    "mx.example.com; " + "dkim=pass header.d=x.example; " * 300,
])
def test_malformed_results_never_raise(value: str) -> None:
    raw = _delivered_by_our_mx(_sent(), f"Authentication-Results: {value}")
    result = _auth(raw)
    assert not result.passed
    assert result.reason


_HEADER_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=120)


@settings(max_examples=150, deadline=None)
@given(results=_HEADER_TEXT, received=_HEADER_TEXT)
def test_any_results_or_received_text_never_raises(results: str, received: str) -> None:
    raw = _crlf(f"Authentication-Results: {results}", f"Received: {received}", _received_by_mx()) + _sent()
    result = _auth(raw, verify_dkim=True, dnsfunc=_Dns({}))
    assert not result.passed or result.method in ("dkim", "spf")
    assert result.reason


def test_malformed_results_are_recorded_as_unreadable() -> None:
    raw = _delivered_by_our_mx(_sent(), "Authentication-Results: mx.example.com (; dkim=pass header.d=example.com")
    result = _auth(raw)
    assert len(result.ignored) == 1 and "unreadable" in result.ignored[0]


def test_many_results_headers_are_capped() -> None:
    many = "\n".join(f"Authentication-Results: other{i}.example; dkim=pass header.d=example.com" for i in range(50))
    result = _auth(_delivered_by_our_mx(_sent(top=many)))
    assert not result.passed
    assert result.ignored[-1] == "30 more Authentication-Results headers not examined (more than 20)"


def test_a_huge_forged_results_header_is_judged_by_its_place_without_reading_it() -> None:
    # authres grows faster than linearly with its input: a megabyte of forged results must
    # be set aside by where it sits and whose it claims to be, never parsed.
    padding = " ".join(f"x{i}=pass" for i in range(100_000))
    sent = _sent(top=f"Authentication-Results: (our server) mx.example.com; dkim=pass header.d=example.com {padding}")
    result = _auth(_delivered_by_our_mx(sent, ip="203.0.113.66"))
    assert not result.passed
    assert "claims mx.example.com, but sits below the Received header by mx.example.com" in result.ignored[0]


def test_an_overlong_results_header_from_our_own_server_is_not_read() -> None:
    padding = " ".join(f"x{i}=pass" for i in range(5_000))
    raw = _delivered_by_our_mx(_sent(), f"Authentication-Results: mx.example.com; dkim=pass header.d=example.com "
                                        f"{padding}")
    result = _auth(raw)
    assert not result.passed
    assert "unreadable (longer than 16,384 characters)" in result.ignored[0]


def test_no_received_at_all_trusts_nothing() -> None:
    # A mail saved from a mail program and fed to `intake ingest` by hand: nothing says where
    # it entered, so a header that says our server checked it is not believed.
    raw = _sent(top="Authentication-Results: mx.example.com; dkim=pass header.d=example.com")
    result = _auth(raw)
    assert not result.passed
    assert "no Received header from our mail servers" in result.ignored[0]
    assert "no Authentication-Results could be believed" in result.reason


def test_an_unknown_network_hop_on_top_trusts_nothing_below_it() -> None:
    # The newest hop is a host we do not know: everything below it may be the sender's,
    # including a Received "by mx.example.com" and the header above it.
    relayed = _delivered_by_our_mx(_sent(), OPENDKIM_PASS)
    raw = _crlf("""
Received: from mx.example.com (mx.example.com [192.0.2.1])
\tby relay.example.org (Postfix) with ESMTP id 9Q; Tue,  3 Feb 2026 10:00:05 +0900
""") + relayed
    result = _auth(raw)
    assert not result.passed
    assert "entered through relay.example.org" in result.ignored[0]


def test_from_with_two_addresses_is_refused() -> None:
    sent = _sent(from_="hanako@example.com, mallory@attacker.example")
    result = _auth(_delivered_by_our_mx(sent, OPENDKIM_PASS))
    assert not result.passed
    assert "exactly one sender" in result.reason


def test_two_from_headers_are_refused() -> None:
    sent = _sent(top="From: mallory@attacker.example")
    result = _auth(_delivered_by_our_mx(sent, OPENDKIM_PASS))
    assert not result.passed
    assert "2 From headers" in result.reason


def test_no_from_address() -> None:
    result = _auth(_delivered_by_our_mx(_sent(from_="undisclosed-recipients:;"), OPENDKIM_PASS))
    assert not result.passed and "no readable From address" in result.reason


def test_nothing_configured_says_so() -> None:
    result = _auth(_delivered_by_our_mx(_sent(), OPENDKIM_PASS), trusted=(), hosts=(INTAKE_HOST,))
    assert not result.passed
    assert "trusted_authserv_ids is empty and verify_dkim is off" in result.reason


# --- where intake sits: direct MX, or behind a mail server ------------------------------

def test_direct_mx_incoming_results_claiming_our_id_are_ignored() -> None:
    # intake's own SMTP listener is the MX: its Received is the boundary, and every
    # Authentication-Results came with the mail.
    sent = _sent(top="Authentication-Results: mx.example.com; dkim=pass header.d=example.com")
    raw = _delivered_by_intake(sent, "ESMTP", helo="mx.example.com", ip="203.0.113.66")
    result = _auth(raw)
    assert not result.passed
    assert "below the Received header by intake.example.com" in result.ignored[0]


def test_behind_postfix_over_lmtp_the_mta_is_the_boundary() -> None:
    # Postfix delivers to intake's LMTP listener: intake's own Received is a local hop.
    raw = _delivered_by_intake(_delivered_by_our_mx(_sent(), OPENDKIM_PASS), "LMTP", helo="mx.example.com",
                               ip="127.0.0.1")
    result = _auth(raw)
    assert result.passed and result.authserv_id == OUR_MX


def test_behind_a_mail_store_over_lmtp() -> None:
    # Postfix → Dovecot (LMTP) → a mailbox intake polls over IMAP.
    raw = _crlf("""
Return-Path: <hanako@example.com>
Delivered-To: support@example.com
Received: from mx.example.com ([10.0.0.5])
\tby imap.example.com with LMTP
\tid 8OlUBxJ5oGmJHQAAqBnRrA
\t(envelope-from <hanako@example.com>)
\tfor <support@example.com>; Tue, 03 Feb 2026 10:00:03 +0900
""") + _delivered_by_our_mx(_sent(), OPENDKIM_PASS)
    assert _auth(raw).passed


def test_an_smtp_hand_over_into_intake_is_the_boundary() -> None:
    # An SMTP listener cannot tell our relay from the internet: a relay must use LMTP.
    raw = _delivered_by_intake(_delivered_by_our_mx(_sent(), OPENDKIM_PASS), "ESMTP", helo="mx.example.com",
                               ip="10.0.0.5")
    result = _auth(raw)
    assert not result.passed
    assert "below the Received header by intake.example.com" in result.ignored[0]


@pytest.mark.parametrize("helo", [
    "x by intake.example.com (intake) with LMTP",  # a second "by" and "with"
    "x with LMTP (",  # swallows the real by clause into a comment that never closes
    "x)",
    "from",
])
def test_helo_text_cannot_make_intakes_received_look_local(helo: str) -> None:
    # The HELO name is copied into intake's Received; a sender picks it. Ambiguous headers
    # believe nothing.
    sent = _sent(top="Authentication-Results: mx.example.com; dkim=pass header.d=example.com" + _received_by_mx())
    raw = _delivered_by_intake(sent, "ESMTP", helo=helo, ip="203.0.113.66")
    result = _auth(raw)
    assert not result.passed
    assert result.ignored


# --- (c) intake verifies DKIM itself ----------------------------------------------------

SELECTOR = b"mail2026"


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, bytes]:
    """A fresh 1024-bit RSA key (dkimpy's minimum): the PEM private key and the DNS TXT record."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


class _Dns:
    """The TXT records of the test's keys; records every name asked for."""

    def __init__(self, records: dict[bytes, bytes]) -> None:
        self.records = records
        self.asked: list[bytes] = []

    def __call__(self, name: bytes, timeout: int = 5) -> bytes | None:
        self.asked.append(name)
        return self.records.get(name)


def _dns_for(rsa_key: tuple[bytes, bytes], domain: bytes = b"example.com") -> _Dns:
    return _Dns({SELECTOR + b"._domainkey." + domain + b".": rsa_key[1]})


def _signed(rsa_key: tuple[bytes, bytes], mail: bytes, domain: bytes = b"example.com", **options: object) -> bytes:
    return dkim.sign(mail, SELECTOR, domain, rsa_key[0], **options) + mail


def test_own_dkim_check_passes_a_valid_aligned_signature(rsa_key: tuple[bytes, bytes]) -> None:
    dns = _dns_for(rsa_key)
    raw = _delivered_by_intake(_signed(rsa_key, _sent()))
    result = _auth(raw, verify_dkim=True, dnsfunc=dns)
    assert result.passed
    assert (result.method, result.domain, result.authserv_id) == ("dkim-verified", "example.com", "")
    assert dns.asked == [b"mail2026._domainkey.example.com."]


def test_own_dkim_check_fails_a_tampered_body(rsa_key: tuple[bytes, bytes]) -> None:
    signed = _signed(rsa_key, _sent())
    tampered = signed.replace("再発行しました".encode(), "返金しました".encode())
    result = _auth(_delivered_by_intake(tampered), verify_dkim=True, dnsfunc=_dns_for(rsa_key))
    assert not result.passed
    assert "the body was changed after example.com signed it" in result.reason


def test_own_dkim_check_fails_a_tampered_subject(rsa_key: tuple[bytes, bytes]) -> None:
    signed = _signed(rsa_key, _sent())
    tampered = signed.replace(b"\r\nSubject: ", b"\r\nSubject: #status closed ", 1)
    assert tampered != signed
    result = _auth(_delivered_by_intake(tampered), verify_dkim=True, dnsfunc=_dns_for(rsa_key))
    assert not result.passed
    assert "does not match the mail" in result.reason


def test_own_dkim_check_refuses_an_unaligned_signer_without_a_lookup(rsa_key: tuple[bytes, bytes]) -> None:
    dns = _dns_for(rsa_key, b"attacker.example")
    raw = _delivered_by_intake(_signed(rsa_key, _sent(), b"attacker.example"))
    result = _auth(raw, verify_dkim=True, dnsfunc=dns)
    assert not result.passed
    assert "a DKIM signature by attacker.example is not aligned with example.com" in result.reason
    assert dns.asked == []


def test_own_dkim_check_fails_without_a_key(rsa_key: tuple[bytes, bytes]) -> None:
    raw = _delivered_by_intake(_signed(rsa_key, _sent()))
    result = _auth(raw, verify_dkim=True, dnsfunc=_Dns({}))
    assert not result.passed
    assert "no usable DKIM key for example.com at mail2026._domainkey.example.com" in result.reason


def test_own_dkim_check_fails_with_an_unusable_key_record(rsa_key: tuple[bytes, bytes]) -> None:
    dns = _Dns({b"mail2026._domainkey.example.com.": b"v=DKIM1; k=rsa; p=bm90IGEga2V5"})
    result = _auth(_delivered_by_intake(_signed(rsa_key, _sent())), verify_dkim=True, dnsfunc=dns)
    assert not result.passed
    assert "the DKIM key of example.com at mail2026._domainkey.example.com is unusable" in result.reason


def test_own_dkim_check_fails_when_the_lookup_fails(rsa_key: tuple[bytes, bytes]) -> None:
    def broken(name: bytes, timeout: int = 5) -> bytes:
        raise OSError("resolver unreachable")

    result = _auth(_delivered_by_intake(_signed(rsa_key, _sent())), verify_dkim=True, dnsfunc=broken)
    assert not result.passed
    assert "could not be looked up (resolver unreachable)" in result.reason


def test_own_dkim_check_refuses_a_body_length_limit(rsa_key: tuple[bytes, bytes]) -> None:
    # l= would let anyone append text (or mail commands) to a replayed agent mail.
    raw = _delivered_by_intake(_signed(rsa_key, _sent(), length=True))
    result = _auth(raw, verify_dkim=True, dnsfunc=_dns_for(rsa_key))
    assert not result.passed
    assert "covers only part of the body (l=)" in result.reason


def test_own_dkim_check_refuses_a_signature_not_covering_from(rsa_key: tuple[bytes, bytes]) -> None:
    signed = _signed(rsa_key, _sent())
    # dkimpy refuses to sign without From (and signs it twice against additions), so the
    # h= list is rewritten by hand; the check comes before any verification.
    unsigned_from = re.sub(rb"h=[^;]*;", b"h=to : subject : date;", signed, count=1)
    assert unsigned_from != signed
    result = _auth(_delivered_by_intake(unsigned_from), verify_dkim=True, dnsfunc=_dns_for(rsa_key))
    assert not result.passed
    assert "does not cover the From header" in result.reason


def test_own_dkim_check_is_off_unless_configured(rsa_key: tuple[bytes, bytes]) -> None:
    dns = _dns_for(rsa_key)
    result = _auth(_delivered_by_intake(_signed(rsa_key, _sent())), dnsfunc=dns)
    assert not result.passed
    assert dns.asked == []


def test_own_dkim_check_rescues_an_mta_that_writes_results_below_its_received(
        rsa_key: tuple[bytes, bytes]) -> None:
    # OpenDKIM/Gmail placement: their header is set aside, the signature itself still counts.
    raw = _crlf(_received_by_mx()) + _crlf(OPENDKIM_PASS) + _signed(rsa_key, _sent())
    result = _auth(raw, verify_dkim=True, dnsfunc=_dns_for(rsa_key))
    assert result.passed and result.method == "dkim-verified"
    assert len(result.ignored) == 1


def test_own_dkim_check_without_a_signature(rsa_key: tuple[bytes, bytes]) -> None:
    result = _auth(_delivered_by_intake(_sent()), verify_dkim=True, dnsfunc=_dns_for(rsa_key))
    assert not result.passed
    assert "the mail has no DKIM-Signature" in result.reason
    assert "send from your example.com mail account" in result.reason


def test_own_dkim_check_on_unreadable_mail_never_raises(rsa_key: tuple[bytes, bytes]) -> None:
    for raw in (b"", b"\x00\xff garbage without headers", b"DKIM-Signature: v=1; d=\r\n\r\nbody",
                b"From: hanako@example.com\r\nDKIM-Signature: ;;;==\r\n\r\nbody"):
        result = _auth(raw, verify_dkim=True, dnsfunc=_dns_for(rsa_key))
        assert not result.passed and result.reason
