"""The SMTP listener on PostgreSQL, where concurrent deliveries share one commit: one bad
envelope or message fails alone, never the deliveries committed beside it (issue 15)."""

from __future__ import annotations

import threading

import psycopg
from mailfactory import make_mail
from smtp_fixtures import IntakeServer, RawClient, smtp_config
from test_postgres import pg_url  # noqa: F401 - the fixture: a throwaway database

GOOD, BAD = 20, 5


def _deliver_together(port: int, senders: list[tuple[str, str]]) -> dict[str, tuple[str, int, str]]:
    """One connection per (sender, subject), all sending the end of their message at the same
    moment, so that the listener commits them together: subject → (step, code, reply),
    where step is the command that was answered last."""
    ready = threading.Barrier(len(senders), timeout=60)
    out: dict[str, tuple[str, int, str]] = {}

    def one(sender: str, subject: str) -> None:
        c = RawClient(port, timeout=60)
        step, code, text = "connect", 0, ""
        try:
            assert c.reply()[0] == 220
            assert c.cmd("EHLO client.example.org")[0] == 250
            for step, line in (("MAIL", f"MAIL FROM:<{sender}>".encode("utf-8", "surrogateescape")),
                               ("RCPT", b"RCPT TO:<support@example.com>"), ("DATA", b"DATA")):
                code, text = c.cmd(line + b"\r\n")
                if code >= 400:
                    return
            raw = make_mail(subject=subject, sender="customer@customer.example.org",
                            message_id=f"<{subject.replace(' ', '-')}@customer.example.org>")
            c.send(raw[:-2])
            ready.wait()
            c.send(b"\r\n.\r\n")
            step = "end of data"
            code, text = c.reply()
        finally:
            if step != "end of data":
                ready.wait()  # refused earlier: the others still go together
            out[subject] = (step, code, text)
            c.close()

    threads = [threading.Thread(target=one, args=s) for s in senders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def _serve(tmp_path, pg_url: str) -> IntakeServer:  # noqa: F811
    cfg = smtp_config(tmp_path, database=pg_url)
    srv = IntakeServer(cfg)
    res = srv.intake("db", "upgrade")
    assert res.returncode == 0, res.stderr
    return srv


def _senders(bad: str) -> list[tuple[str, str]]:
    good = [("alice@customer.example.org", f"good {n:02d}") for n in range(GOOD)]
    return good + [(bad.format(n=n), f"bad {n}") for n in range(BAD)]


def test_a_nul_in_the_envelope_is_refused_at_mail_from_and_fails_no_neighbour(tmp_path, pg_url):  # noqa: F811
    """``MAIL FROM:<p\\0@b.test>`` was answered 451 for ever and failed the commit it shared
    (19 of 20 deliveries beside five such messages got 451). The NUL is refused at once,
    permanently; every good delivery is answered 250 and stored."""
    srv = _serve(tmp_path, pg_url).start()
    try:
        results = _deliver_together(srv.port, _senders("p{n}\x00@b.test"))
        good = {s: r for s, r in results.items() if s.startswith("good")}
        assert all(code == 250 for _, code, _ in good.values()), good
        bad = [r for s, r in results.items() if s.startswith("bad")]
        assert bad == [("MAIL", 501, "501 5.1.7 Bad sender address syntax: control character")] * BAD
        cases = srv.wait_for_cases(GOOD)
        assert sorted(c["subject"] for c in cases) == sorted(good)
    finally:
        srv.stop()


def test_a_commit_that_fails_on_one_message_is_retried_one_by_one(tmp_path, pg_url):  # noqa: F811
    """Whatever the database refuses in one message (here a trigger refuses its sender, as
    PostgreSQL refuses text it cannot store), the deliveries committed with it are
    committed again one by one: only that message gets 451, every other one 250."""
    srv = _serve(tmp_path, pg_url)
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("""
            CREATE FUNCTION refuse_poison() RETURNS trigger AS $$
            BEGIN
                IF NEW.envelope_from LIKE 'poison%' THEN
                    RAISE EXCEPTION 'this database refuses %', NEW.envelope_from USING ERRCODE = '22023';
                END IF;
                RETURN NEW;
            END $$ LANGUAGE plpgsql""")
        conn.execute("CREATE TRIGGER refuse_poison BEFORE INSERT ON inbound FOR EACH ROW EXECUTE FUNCTION refuse_poison()")
    srv.start()
    try:
        results = _deliver_together(srv.port, _senders("poison{n}@b.test"))
        good = {s: r for s, r in results.items() if s.startswith("good")}
        assert all(code == 250 for _, code, _ in good.values()), good
        bad = [r for s, r in results.items() if s.startswith("bad")]
        assert [(step, code) for step, code, _ in bad] == [("end of data", 451)] * BAD, bad
        assert "one by one" in srv.log_text()  # they did share a commit
        cases = srv.wait_for_cases(GOOD)
        assert sorted(c["subject"] for c in cases) == sorted(good)
    finally:
        srv.stop()
