"""Parse speed on small mixed mails, and the cost of hostile mail.

Run: .venv/bin/python bench/parse_bench.py [ROUNDS] [--hostile | --no-hostile] [--only=TEXT] [--timeout=S]
Prints one line per kind of mail and one for the mix: messages per second (wall clock)
and CPU microseconds per message. Pure CPU, no I/O; on a shared machine the wall-clock
figure varies with the load of the other users, the CPU figure less so.

Then each hostile shape (100,000 encoded words, 10,000 parts, nesting 1,000 deep, a 1 MB
header line, a mail at the 25 MB limit, HTML bodies of tag soup, unclosed comments and
nested quotes...) is parsed once in a fresh process: seconds
(wall and CPU) and the peak memory of that whole process (VmHWM: interpreter, the raw
mail and the parse). Targets: at most 2 s and 200 MB each. ``--hostile`` runs only these;
``--only=HTML`` only the shapes whose name holds "HTML"; ``--timeout`` ends a shape that
takes longer (600 s; the code before issue 14 takes hours on some HTML shapes).
"""

from __future__ import annotations

import base64
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from intake.mail.headers import decode_words  # noqa: E402
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


def _head(subject: str = "hostile") -> bytes:
    return (HEAD + f"From: Mallory <mallory@example.org>\r\nSubject: {subject}\r\n"
            "Message-ID: <h@example.org>\r\n").encode()


def _encoded_words() -> bytes:
    # One Subject of 100,000 encoded words (1.7 MB), folded as mailers fold.
    words = ["=?UTF-8?B?5pel?="] * 100_000
    lines = "\r\n ".join(" ".join(words[i : i + 4]) for i in range(0, len(words), 4))
    return HEAD.encode() + b"From: a@example.org\r\nSubject: " + lines.encode() + b"\r\n\r\nbody\r\n"


def _unterminated_words() -> bytes:
    # 100,000 encoded-word openings that never close: a naive regex rescans to the end.
    return HEAD.encode() + b"From: a@example.org\r\nSubject: " + b"=?utf-8?q?x " * 100_000 + b"\r\n\r\nbody\r\n"


def _many_parts() -> bytes:
    part = b"--P\r\nContent-Type: text/plain; name=f%d.txt\r\n\r\npart %d\r\n"
    parts = b"".join(part % (i, i) for i in range(10_000))
    return _head() + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="P"\r\n\r\n' + parts + b"--P--\r\n"


def _empty_parts_25mb() -> bytes:
    # 3.6 million parts with nothing in them: a Message each, were they all read.
    return (_head() + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="P"\r\n\r\n'
            + b"--P\r\n\r\n" * 3_600_000 + b"--P--\r\n")


def _attached_messages() -> bytes:
    part = b"--P\r\nContent-Type: message/rfc822\r\n\r\nSubject: m%d\r\n\r\nx\r\n"
    parts = b"".join(part % i for i in range(100_000))
    return _head() + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="P"\r\n\r\n' + parts + b"--P--\r\n"


def _part_header_fields() -> bytes:
    return (_head() + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="P"\r\n\r\n--P\r\n'
            + b"X: y\r\n" * 4_000_000 + b"\r\nbody\r\n--P--\r\n")


def _deep_nesting() -> bytes:
    nested = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(1_000))
    return _head() + nested + b"Content-Type: text/plain\r\n\r\nhi\r\n"


def _long_subject_line() -> bytes:
    return HEAD.encode() + b"From: a@example.org\r\nSubject: " + b"long " * 210_000 + b"\r\n\r\nbody\r\n"


def _long_to_line() -> bytes:
    rcpts = b", ".join(b"user%d@example.org" % i for i in range(50_000))  # ~1 MB, one line
    return _head() + b"Cc: " + rcpts + b"\r\n\r\nbody\r\n"


def _many_fields() -> bytes:
    return _head() + b"".join(b"X-Field-%d: value %d\r\n" % (i, i) for i in range(100_000)) + b"\r\nbody\r\n"


def _deep_and_big() -> bytes:
    # Too deep for the stdlib parser, and at the size limit: kept as one attachment.
    nested = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(3_000))
    return _head() + nested + b"Content-Type: text/plain\r\n\r\n" + b"hello world\r\n" * 1_800_000


def _huge_attachment() -> bytes:
    data = os.urandom(18 * 1024 * 1024)  # 24 MB once base64-encoded: a mail at the 25 MB limit
    return (_head() + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="M"\r\n\r\n'
            b"--M\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--M\r\n"
            b"Content-Type: application/octet-stream; name=big.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(data).replace(b"\n", b"\r\n") + b"--M--\r\n")


def _huge_header() -> bytes:
    # 25 MB of header and no body: a header field without end.
    return _head() + b"X-Junk: " + b"x" * (25 * 1024 * 1024) + b"\r\n"


def _html(unit: str, size: int = 10_000_000, before: str = "") -> Callable[[], bytes]:
    """An HTML-only mail of ``size`` bytes of ``unit`` repeated (after ``before``): its
    text is made by html_to_text. Built when measured, not when the module is imported."""
    def build() -> bytes:
        body = before + unit * (size // len(unit))
        return (_head("html") + b"Content-Type: text/html; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: 8bit\r\n\r\n<p>Hello,</p>" + body.encode() + b"\r\n")
    return build


# What html.parser cannot finish at the end of the input it used to show as text a piece
# at a time, parsing again from each next "<" to the end: quadratic (CVE-2025-6069).
# Nested quotes made text quadratic in the nesting; '<' alone is the costliest markup per
# byte; '<![ ' makes html.parser raise, and the tags are stripped instead. Text is made
# from the first 128 KiB (parse.MAX_HTML_CHARS): the 10 MB shapes show what that bounds.
HTML_HOSTILE: dict[str, Callable[[], bytes]] = {
    "HTML 1 MB of '<a'": _html("<a", 1_000_000),
    "HTML 10 MB of '<a'": _html("<a"),
    "HTML 10 MB of '<a x=\"'": _html('<a x="'),
    "HTML 10 MB of '<!--'": _html("<!--"),
    "HTML 10 MB of '</'": _html("</"),
    "HTML 10 MB of '<?'": _html("<?"),
    "HTML 10 MB of '<![CDATA['": _html("<![CDATA["),
    "HTML 10 MB '<style>' open": _html("<a", before="<style>"),
    "HTML 10 MB of ' <br>'": _html(" <br>"),
    "HTML 10 MB '<blockquote>x'": _html("<blockquote>x"),
    "HTML 10 MB of '<'": _html("<"),
    "HTML 10 MB of '<p>x</p>'": _html("<p>x</p>"),
    "HTML 10 MB '<![ ' + '<x'": _html("<x", before="<![ "),
    # One tag of many attributes: html.parser's regex keeps ~250 bytes a character of it.
    "HTML 25 MB '<a x x x...'": _html(" x", 25_000_000, before="<a"),
}


HOSTILE: dict[str, Callable[[], bytes]] = {
    "100,000 encoded words": _encoded_words,
    "100,000 unclosed words": _unterminated_words,
    "10,000 MIME parts": _many_parts,
    "3.6 million empty parts, 25 MB": _empty_parts_25mb,
    "100,000 attached messages": _attached_messages,
    "4 million fields in a part, 24 MB": _part_header_fields,
    "nesting 1,000 deep": _deep_nesting,
    "nesting 3,000 deep, 25 MB": _deep_and_big,
    "1 MB Subject line": _long_subject_line,
    "1 MB Cc line": _long_to_line,
    "100,000 header fields": _many_fields,
    "25 MB attachment": _huge_attachment,
    "25 MB header field": _huge_header,
    **HTML_HOSTILE,
}


def _measure_one(path: str) -> None:
    """In a fresh process: parse the mail in ``path`` once, print time and peak memory."""
    raw = Path(path).read_bytes()
    w0, c0 = time.perf_counter(), time.process_time()
    mail = parse(raw)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    print(json.dumps({"wall": wall, "cpu": cpu, "peak_mb": _peak_mb(), "defects": len(mail.defects)}))


def _peak_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec;
    ru_maxrss would carry over the parent's size at fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _words_uncut() -> None:
    """parse() decodes at most 1,000 words of a field; the decoder itself is linear."""
    value = " ".join(["=?UTF-8?B?5pel?="] * 100_000)
    c0 = time.process_time()
    text = decode_words(value, max_words=len(value))
    cpu = time.process_time() - c0
    assert text == "日" * 100_000
    print(f"decode_words alone, 100,000 words (1.7 MB), no cut: {cpu:.2f} CPU s")


def hostile(only: str = "", timeout: float = 600) -> None:
    """Each hostile shape in its own process, so that each peak is its own; ``only``
    keeps the shapes whose name holds it, ``timeout`` bounds each (seconds)."""
    print()
    _words_uncut()
    print(f"{'hostile mail':26s} {'MB':>6s}  {'wall s':>7s}  {'CPU s':>6s}  {'peak MB':>8s}  (process peak RSS)")
    for name, build in HOSTILE.items():
        if only not in name:
            continue
        raw = build()
        with tempfile.NamedTemporaryFile(suffix=".eml") as f:
            f.write(raw)
            f.flush()
            try:
                res = subprocess.run([sys.executable, __file__, "--one", f.name], capture_output=True,
                                     text=True, timeout=timeout, check=True)
            except subprocess.SubprocessError as exc:
                print(f"{name:26s} {len(raw) / 1e6:6.1f}  failed: {exc}")
                continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{name:26s} {len(raw) / 1e6:6.1f}  {r['wall']:7.2f}  {r['cpu']:6.2f}  {r['peak_mb']:8.0f}")


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--one"]:
        _measure_one(args[1])
        return
    options = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    only, timeout = options.get("only", ""), float(options.get("timeout", 600))
    if "--hostile" in args:
        hostile(only, timeout)
        return
    numbers = [a for a in args if not a.startswith("--")]
    rounds = int(numbers[0]) if numbers else 2000
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
    if "--no-hostile" not in args:
        hostile(only, timeout)


if __name__ == "__main__":
    main()
