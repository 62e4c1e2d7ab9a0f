"""Outbound mail figures: render+enqueue cost per acknowledgement, delivery throughput to a local relay.

    .venv/bin/python bench/outbox_bench.py [--cases 300] [--mails 2000]

Prints: the cost of rendering one ack, of building its MIME bytes, the extra processing time
per new case that notify adds (ack + 2 agent notices rendered and queued in the case's
transaction), and outbox delivery to an aiosmtpd relay on 127.0.0.1 over one reused
connection and over several.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from aiosmtpd.controller import Controller  # noqa: E402
from conftest import write_config  # noqa: E402
from mailfactory import make_mail  # noqa: E402

from intake.app import open_app  # noqa: E402
from intake.config import load_config  # noqa: E402
from intake.db import utcnow  # noqa: E402
from intake.db.outbox import NewMail  # noqa: E402
from intake.notify import sample_context  # noqa: E402
from intake.edges.outbox_sender import build_mime, deliver_due  # noqa: E402
from intake.templates import SHIPPED, TemplateSet  # noqa: E402


class CountingRelay:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
        self.count += 1
        return "250 2.0.0 OK"


def per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def bench_render(n: int) -> None:
    tset = TemplateSet(SHIPPED, "ja")
    for lang in ("ja", "en"):
        ctx = sample_context("ack", lang)
        tset.render("ack", ctx, language=lang)  # compile once
        t = per_call(lambda: tset.render("ack", ctx, language=lang), n)
        print(f"render ack ({lang}, text+html):          {t * 1e6:8.0f} µs")


def bench_process(cases: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        app = open_app(load_config(write_config(Path(d))), create=True)
        ids = [app.store.receive(make_mail(subject=f"質問 {i}", sender=f"user{i}@client{i}.example",
                                           body="請求書が届きません。\n"), channel="email",
                                 mailbox="support@example.com", envelope_to=["support@example.com"])
               for i in range(cases)]
        proc = app.processor
        notifier = proc.notifier
        spent = [0.0]
        original = notifier.new_case

        def timed(*a, **kw):  # noqa: ANN002, ANN003
            t = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t

        notifier.new_case = timed  # type: ignore[method-assign]
        proc.process(ids[0])
        spent[0] = 0.0
        start = time.perf_counter()
        for i in ids[1:]:
            proc.process(i)
        total = (time.perf_counter() - start) / (cases - 1)
        with app.store.read() as tx:
            queued = len(tx.outbox.list())
            item = tx.outbox.list(limit=1)[0]
        per_case = spent[0] / (cases - 1)
        t = per_call(lambda: build_mime(item), 300)
        app.close()
    print(f"build MIME of one queued mail (7bit):     {t * 1e6:8.0f} µs (at delivery time)")
    print(f"notify step per new case (ack + 2 agent notices: loop checks, render, 3 messages + 3 outbox rows): "
          f"{per_case * 1e3:.2f} ms ≈ {per_case / 3 * 1e3:.2f} ms per mail")
    print(f"whole processing of one new case incl. its durable commit: {total * 1e3:.2f} ms ({queued} mails queued)")


def bench_delivery(mails: int) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    relay = CountingRelay()
    controller = Controller(relay, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        for conns in (1, 4):
            with tempfile.TemporaryDirectory() as d:
                app = open_app(load_config(write_config(Path(d), f'mode = "smtp"\nhost = "127.0.0.1"\nport = {port}\n')),
                               create=True)
                rid = app.store.receive(make_mail(subject="請求書", body="届きません\n"), channel="email",
                                        mailbox="support@example.com", envelope_to=["support@example.com"])
                app.processor.process(rid)
                with app.store.transaction() as tx:
                    t = tx.outbox.list()[-1]
                    for i in range(mails):
                        tx.outbox.add(NewMail(
                            case_id=t.case_id, message_row_id=None, inbound_id=None, at=t.created_at,
                            template=t.template, audience=t.audience, auto_submitted=t.auto_submitted, language="ja",
                            mail_from=t.mail_from, recipient=t.recipient, recipients=t.recipients,
                            message_id=f"bench-{i}-{t.message_id}", headers=t.headers, subject=t.subject,
                            text=t.text, html=t.html, give_up_at=t.give_up_at))
                before = relay.count
                cfg = replace(app.cfg, outbound=replace(app.cfg.outbound, connections=conns))
                start = time.perf_counter()
                report = deliver_due(cfg, app.store, utcnow())
                elapsed = time.perf_counter() - start
                assert relay.count - before == report.sent, (relay.count - before, report)
                print(f"deliver {report.sent} mails over {conns} connection(s):  {report.sent / elapsed:8.0f} msgs/s "
                      f"({elapsed:.2f} s, batches of {cfg.outbound.batch_size}, results committed within 10 ms of each answer)")
                app.close()
    finally:
        controller.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--mails", type=int, default=2000)
    args = ap.parse_args()
    logging.disable(logging.INFO)
    bench_render(1000)
    bench_process(args.cases)
    bench_delivery(args.mails)


if __name__ == "__main__":
    main()
