"""Hand-made test mails as exact bytes (charsets and encodings chosen per test)."""

from __future__ import annotations

import base64
import itertools

_seq = itertools.count(1)


def b64_word(text: str, charset: str = "utf-8") -> str:
    """An RFC 2047 B encoded-word."""
    return f"=?{charset}?B?{base64.b64encode(text.encode(charset)).decode()}?="


def make_mail(
    *,
    subject: str = "Printer does not print",
    sender: str = "Alice Example <alice@customer.example.org>",
    to: str = "support@example.com",
    cc: str | None = None,
    body: str = "Hello,\nmy printer does not print.\n",
    charset: str = "utf-8",
    cte: str = "8bit",
    message_id: str | None = "auto",
    headers: dict[str, str] | None = None,
    date: str = "Fri, 20 Nov 2026 10:00:00 +0900",
) -> bytes:
    """A single-part text mail; the subject is encoded as an RFC 2047 word when not ASCII."""
    if message_id == "auto":
        message_id = f"<test-{next(_seq)}-{id(body)}@customer.example.org>"
    subj = subject if subject.isascii() else b64_word(subject, charset if charset.startswith("iso-2022") else "utf-8")
    lines = [f"From: {sender}", f"To: {to}"]
    if cc:
        lines.append(f"Cc: {cc}")
    lines += [f"Subject: {subj}", f"Date: {date}"]
    if message_id:
        lines.append(f"Message-ID: {message_id}")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    lines += ["MIME-Version: 1.0", f"Content-Type: text/plain; charset={charset}", f"Content-Transfer-Encoding: {cte}"]
    # Non-ASCII left in other headers goes out as raw 8-bit UTF-8, as many clients send it.
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n"
    payload = body.encode(charset)
    if cte == "base64":
        payload = base64.encodebytes(payload)
    return head + payload.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


#: The authserv-id of the mail server in front of intake in the tests (conftest's config trusts it).
TRUSTED_MX = "mx.example.com"


def agent_auth(domain: str = "example.com", authserv_id: str = TRUSTED_MX) -> dict[str, str]:
    """Headers our own mail server adds to an agent's mail it authenticated: an
    Authentication-Results above its Received (header order: newest first)."""
    return {"Authentication-Results": f"{authserv_id}; dkim=pass header.d={domain} header.s=s1; "
                                      f"spf=pass smtp.mailfrom={domain}",
            "Received": f"from mail.{domain} (mail.{domain} [192.0.2.10]) by {authserv_id} with ESMTPS id 4abc; "
                        "Fri, 20 Nov 2026 10:00:05 +0900"}
