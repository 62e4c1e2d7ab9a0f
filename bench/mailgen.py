"""Generated mixed mail for benchmarks: plain, HTML, Japanese, replies, some attachments."""

from __future__ import annotations

import base64
import random
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from datetime import datetime, timezone
from pathlib import Path

_JA_SUBJECTS = ["請求書の再発行のお願い", "ログインできません", "至急：サーバーが停止しています", "①番の商品について",
                "㈱山田商事より見積依頼", "髙橋です～配送の件"]
_EN_SUBJECTS = ["Printer does not print", "Invoice missing", "URGENT: outage", "Feature request: dark mode",
                "Cannot reset password", "Shipping delay"]
_JA_BODY = "お世話になっております。\n株式会社サンプルの山田です。\n\n{n}件目のお問い合わせです。ご確認のほどよろしくお願いいたします。\n"
_EN_BODY = "Hello,\n\nthis is request number {n}. Please have a look.\n\nBest regards,\nAlice\n"


def _legacy_japanese(msg: EmailMessage, text: str, charset: str, codec: str, cte: str) -> None:
    """A body in a legacy Japanese charset, as Japanese mail programs send it."""
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = f'text/plain; charset="{charset}"'
    msg["Content-Transfer-Encoding"] = cte
    data = text.encode(codec, "replace")
    msg.set_payload(base64.encodebytes(data).decode() if cte == "base64" else data.decode("ascii"))


def make(n: int, rng: random.Random, earlier: list[str]) -> tuple[bytes, str]:
    """Mail number ``n``; returns (raw bytes, its Message-ID). ``earlier``: ids it may reply to."""
    kind = rng.random()
    mid = f"<bench-{n}-{rng.getrandbits(40):x}@customer{n % 97}.example.org>"
    msg = EmailMessage(policy=SMTP)
    ja = kind < 0.4
    msg["From"] = f"{'山田 太郎' if ja else 'Alice Example'} <user{n % 500}@customer{n % 97}.example.org>"
    msg["To"] = "support@example.com" if n % 3 else "billing@example.com"
    subject = rng.choice(_JA_SUBJECTS if ja else _EN_SUBJECTS)
    if earlier and rng.random() < 0.2:
        msg["In-Reply-To"] = earlier[rng.randrange(len(earlier))]
        msg["References"] = msg["In-Reply-To"]
        subject = ("Re: " if not ja else "返信: ") + subject
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime(2026, 11, 20, 10, n % 60, tzinfo=timezone.utc))
    msg["Message-ID"] = mid
    body = (_JA_BODY if ja else _EN_BODY).format(n=n)
    legacy = False
    if ja and kind < 0.25:
        _legacy_japanese(msg, body, "ISO-2022-JP", "iso2022_jp", "7bit")
        legacy = True
    elif ja and kind < 0.32:
        _legacy_japanese(msg, body, "Shift_JIS", "cp932", "base64")
        legacy = True
    elif ja or kind >= 0.7:
        msg.set_content(body)
    else:
        msg.set_content(body)
        msg.add_alternative(f"<html><body><p>{body.replace(chr(10), '<br>')}</p></body></html>", subtype="html")
    if not legacy and rng.random() < 0.03:
        msg.add_attachment(rng.randbytes(50_000), maintype="application", subtype="pdf",
                           filename=f"見積書{n}.pdf" if ja else f"invoice-{n}.pdf")
    return msg.as_bytes(), mid


def generate(folder: Path, count: int, seed: int = 1, replies: bool = True) -> None:
    """Write ``count`` mails as ``NNNNNN.eml`` into ``folder`` (``replies=False``: every one a new case)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    earlier: list[str] = []
    for n in range(count):
        raw, mid = make(n, rng, earlier)
        if replies:
            earlier.append(mid)
        if len(earlier) > 200:
            earlier.pop(0)
        (folder / f"{n:06d}.eml").write_bytes(raw)
