"""Parse speed on small mixed mails: messages per second and microseconds per message.

Run: .venv/bin/python bench/parse_bench.py [ROUNDS]
Prints one line per kind of mail and one for the mix: messages per second (wall clock)
and CPU microseconds per message. Pure CPU, no I/O; on a shared machine the wall-clock
figure varies with the load of the other users, the CPU figure less so.
"""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from intake.mail.parse import parse  # noqa: E402


def _jis(text: str) -> bytes:
    return text.encode("iso-2022-jp")


def _b(text: str, cs: str) -> str:
    return base64.b64encode(text.encode(cs)).decode()


HEAD = (
    "Received: from mx.example.net by mx.example.com; Mon, 2 Feb 2026 10:00:00 +0900\r\n"
    "Date: Mon, 2 Feb 2026 10:00:00 +0900\r\nMIME-Version: 1.0\r\n"
    "To: support@example.com\r\n"
)

MAILS: dict[str, bytes] = {
    "plain English": (
        HEAD + "From: Alice Smith <alice@example.org>\r\nSubject: Cannot log in\r\n"
        "Message-ID: <p1@example.org>\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        + "Hello,\r\n\r\nI cannot log in since this morning. Could you help?\r\n\r\nAlice\r\n"
    ).encode(),
    "ISO-2022-JP": (
        (
            HEAD + f"From: =?ISO-2022-JP?B?{_b('山田 太郎', 'iso-2022-jp')}?= <taro@example.jp>\r\n"
            f"Subject: =?ISO-2022-JP?B?{_b('ログインできません', 'iso-2022-jp')}?=\r\n"
            "Message-ID: <p2@example.jp>\r\nContent-Type: text/plain; charset=ISO-2022-JP\r\n"
            "Content-Transfer-Encoding: 7bit\r\n\r\n"
        ).encode()
        + _jis("お世話になっております。\r\n今朝からログインできません。\r\nよろしくお願いいたします。\r\n")
    ),
    "Shift_JIS": (
        (
            HEAD + f"From: =?Shift_JIS?B?{_b('髙橋', 'cp932')}?= <takahashi@example.jp>\r\n"
            f"Subject: =?Shift_JIS?B?{_b('請求書の件 ①', 'cp932')}?=\r\n"
            "Message-ID: <p3@example.jp>\r\nContent-Type: text/plain; charset=Shift_JIS\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
        ).encode()
        + "請求書の金額が違います～。㈱テスト\r\n".encode("cp932")
    ),
    "HTML only": (
        HEAD + "From: Bob <bob@example.org>\r\nSubject: Order\r\nMessage-ID: <p4@example.org>\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n"
        "<html><body><p>Hello,</p><p>My order <b>#1234</b> has not arrived.</p>"
        "<ul><li>ordered 1 Feb</li><li>paid</li></ul><p>Bob</p></body></html>\r\n"
    ).encode(),
    "alternative + attachment": (
        HEAD + "From: Carol <carol@example.org>\r\nSubject: Re: Invoice\r\n"
        "Message-ID: <p5@example.org>\r\nIn-Reply-To: <x@example.com>\r\n"
        'Content-Type: multipart/mixed; boundary="M"\r\n\r\n--M\r\n'
        'Content-Type: multipart/alternative; boundary="A"\r\n\r\n--A\r\n'
        "Content-Type: text/plain; charset=utf-8\r\n\r\nSee the attached invoice.\r\n--A\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n<p>See the attached invoice.</p>\r\n--A--\r\n"
        "--M\r\nContent-Type: application/pdf; name=invoice.pdf\r\n"
        "Content-Disposition: attachment; filename=invoice.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(b"%PDF-1.4 " * 200).decode().replace("\n", "\r\n")
        + "--M--\r\n"
    ).encode(),
}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    total_n = 0
    total_wall = total_cpu = 0.0
    print(f"{'mail':26s} {'size':>6s}  {'msgs/s':>9s}  {'CPU µs/msg':>10s}  (wall clock; CPU time of this process)")
    for name, raw in MAILS.items():
        parse(raw)  # warm up
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(rounds):
            parse(raw)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        total_n += rounds
        total_wall += wall
        total_cpu += cpu
        print(f"{name:26s} {len(raw):6d}  {rounds / wall:9.0f}  {cpu / rounds * 1e6:10.1f}")
    print(f"{'mix':26s} {'':6s}  {total_n / total_wall:9.0f}  {total_cpu / total_n * 1e6:10.1f}")


if __name__ == "__main__":
    main()
