"""The SMTP listener of ``intake serve`` over real sockets: smtplib and swaks as clients."""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
import subprocess
import time

import pytest
import trustme
from mailfactory import b64_word, make_mail
from smtp_fixtures import IntakeServer, RawClient, smtp_config


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> IntakeServer:
    folder = tmp_path_factory.mktemp("smtp")
    srv = IntakeServer(smtp_config(folder, 'max_message_size = "200KB"\n')).start()
    yield srv
    srv.stop()




def test_greeting_and_ehlo_announce_what_senders_need(server):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        code, ehlo = s.ehlo("client.example.org")
        assert code == 250
        features = ehlo.decode().splitlines()
        assert features[0] == "mx.intake.test"
        assert "SIZE 204800" in features
        assert "8BITMIME" in features and "SMTPUTF8" in features
        assert "STARTTLS" not in features  # no certificate configured
    raw = RawClient(server.port)
    code, greeting = raw.reply()
    assert code == 220 and greeting.startswith("220 mx.intake.test ")
    raw.close()


def test_mail_to_a_mailbox_becomes_a_case_with_trace_headers(server):
    raw = make_mail(subject="SMTP smoke test", sender="Ken <ken@bigcorp.example>")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo()
        s.mail("ken@bigcorp.example")
        s.rcpt("support@example.com")
        code, reply = s.data(raw)
    assert code == 250 and reply.startswith(b"2.0.0 OK: queued as S")
    case = server.case_with_subject("SMTP smoke test")
    assert case["mailbox"] == "support@example.com" and case["requester"] == "ken@bigcorp.example"
    detail = json.loads(server.intake("cases", "show", case["number"], "--json").stdout)
    assert any(e["type"] == "message" and "printer does not print" in e["text"] for e in detail["timeline"])
    # The id in the reply finds the message's processing log.
    spool_ref = reply.decode().rsplit(" ", 1)[1]
    shown = json.loads(server.intake("messages", "show", spool_ref, "--json").stdout)
    assert shown["case"] == case["number"] and shown["source"]["protocol"] == "smtp"


def test_iso_2022_jp_mail_over_smtp(server):
    raw = make_mail(subject="請求書の再発行について", sender=f"{b64_word('山田 太郎', 'iso-2022-jp')} <taro@bigcorp.co.jp>",
                    body="いつもお世話になっております。\n請求書を再発行してください。\n", charset="iso-2022-jp", cte="7bit")
    assert raw.isascii()  # 7-bit JIS, as Japanese mail programs send it
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        assert s.sendmail("taro@bigcorp.co.jp", ["support@example.com"], raw) == {}
    case = server.case_with_subject("請求書の再発行について")
    assert case["requester_name"] == "山田 太郎"
    detail = json.loads(server.intake("cases", "show", case["number"], "--json").stdout)
    assert any("請求書を再発行してください" in (e.get("text") or "") for e in detail["timeline"])


def test_utf8_mail_with_smtputf8_envelope_and_8bit_body(server):
    raw = make_mail(subject="注文の件 UTF-8", sender="佐藤 <佐藤@bigcorp.co.jp>", body="配送が遅れています。\n", cte="8bit")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo()
        assert s.has_extn("smtputf8")
        refused = s.sendmail("佐藤@bigcorp.co.jp", ["support@example.com"], raw, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        assert refused == {}
    case = server.case_with_subject("注文の件 UTF-8")
    detail = json.loads(server.intake("cases", "show", case["number"], "--json").stdout)
    assert any("配送が遅れています" in (e.get("text") or "") for e in detail["timeline"])


def test_plus_address_is_accepted_for_its_mailbox(server):
    raw = make_mail(subject="via plus address", to="billing+invoices@example.com")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        assert s.sendmail("alice@customer.example.org", ["Billing+Invoices@Example.COM"], raw) == {}
    case = server.case_with_subject("via plus address")
    assert case["mailbox"] == "billing@example.com" and case["queue"] == "billing"


def stored_ids(srv: IntakeServer) -> set[int]:
    res = srv.read("messages", "list", "--json")
    assert res.returncode == 0, res.stderr
    return {m["id"] for m in json.loads(res.stdout)}


def assert_only_the_marker_was_stored(srv: IntakeServer, before: set[int]) -> None:
    """Send a good mail after refused ones: once it is a case, everything sent before it has
    been stored and processed, so the only new record must be its own."""
    marker = f"marker {time.monotonic_ns()}"
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
        assert s.sendmail("alice@customer.example.org", ["support@example.com"], make_mail(subject=marker)) == {}
    case = srv.case_with_subject(marker)
    new = [m for m in json.loads(srv.read("messages", "list", "--json").stdout) if m["id"] not in before]
    assert [(m["subject"], m["case"]) for m in new] == [(marker, case["number"])]


def test_strangers_and_relay_attempts_get_550_5_1_1(server):
    before = stored_ids(server)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo()
        assert s.mail("spammer@bad.example")[0] == 250
        for rcpt in ("nobody@example.com", "victim@gmail.com", "support@example.com.evil.example",
                     "victim%gmail.com@example.com"):
            code, text = s.rcpt(rcpt)
            assert code == 550 and text.startswith(b"5.1.1"), (rcpt, code, text)
        assert s.rcpt("support@example.com")[0] == 250
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.sendmail("spammer@bad.example", ["victim@gmail.com"], make_mail(subject="relay me"))
    assert_only_the_marker_was_stored(server, before)


def test_oversize_mail_gets_552_5_3_4_announced_or_not(server):
    before = stored_ids(server)
    big = make_mail(subject="too big", body="x" * 300_000)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        with pytest.raises(smtplib.SMTPSenderRefused) as exc:  # SIZE=… at MAIL FROM
            s.sendmail("alice@customer.example.org", ["support@example.com"], big)
        assert exc.value.smtp_code == 552 and exc.value.smtp_error.startswith(b"5.3.4")
    # A client that does not declare the size is refused after the data.
    c = RawClient(server.port)
    c.reply()
    c.cmd("EHLO client")
    assert c.cmd("MAIL FROM:<alice@customer.example.org>")[0] == 250
    assert c.cmd("RCPT TO:<support@example.com>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(big.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n")
    code, text = c.reply()
    assert code == 552 and text.startswith("552 5.3.4"), text
    # The session goes on: a normal message after it is accepted.
    assert c.cmd("MAIL FROM:<alice@customer.example.org>")[0] == 250
    c.close()
    assert_only_the_marker_was_stored(server, before)


def test_long_lines_are_accepted(server):
    body = "A" * 5000 + "\n" + "長い行" * 2000 + "\n"
    raw = make_mail(subject="long lines", body=body)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        assert s.sendmail("alice@customer.example.org", ["support@example.com"], raw) == {}
    case = server.case_with_subject("long lines")
    detail = json.loads(server.intake("cases", "show", case["number"], "--json").stdout)
    assert any("A" * 5000 in (e.get("text") or "") for e in detail["timeline"])


def test_swaks_as_a_foreign_client(server, tmp_path):
    eml = tmp_path / "m.eml"
    eml.write_bytes(make_mail(subject="from swaks 日本語", sender="Hanako <hanako@customer.example.org>"))
    res = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(server.port), "--from",
                          "hanako@customer.example.org", "--to", "support+swaks@example.com", "--data", str(eml),
                          "--timeout", "30"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "250 2.0.0" in res.stdout
    server.case_with_subject("from swaks 日本語")
    res = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(server.port), "--from", "x@y.example",
                          "--to", "stranger@example.com", "--timeout", "30"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "550 5.1.1" in res.stdout


def test_bounce_with_null_sender_opens_no_case(server):
    raw = make_mail(subject="Undelivered Mail Returned to Sender", sender="MAILER-DAEMON@relay.example",
                    message_id="<bounce-1@relay.example>")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        assert s.sendmail("", ["support@example.com"], raw) == {}
    deadline = time.monotonic() + 30
    while True:  # until it has been processed
        found = [m for m in json.loads(server.read("messages", "list", "--json").stdout)
                 if m["message_id"] == "bounce-1@relay.example" and m["state"] != "received"]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(m["state"], m["case"]) for m in found] == [("dropped", None)]
    assert not [c for c in server.cases() if c["subject"] == "Undelivered Mail Returned to Sender"]


def test_recipient_limit_gives_452(tmp_path):
    srv = IntakeServer(smtp_config(tmp_path, "max_recipients = 2\n")).start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
            s.ehlo()
            s.mail("alice@customer.example.org")
            assert s.rcpt("support@example.com")[0] == 250
            assert s.rcpt("support+a@example.com")[0] == 250
            code, text = s.rcpt("billing@example.com")
            assert code == 452 and text.startswith(b"4.5.3")
            code, _ = s.data(make_mail(subject="two recipients"))
            assert code == 250
        assert [c["subject"] for c in srv.wait_for_cases(1)] == ["two recipients"]
    finally:
        srv.stop()


def admitted(port: int, timeout: float = 30) -> RawClient:
    """A connection the listener greets with 220, once a slot is free (bounded in time)."""
    deadline = time.monotonic() + timeout
    while True:
        c = RawClient(port)
        code, text = c.reply()
        if code == 220:
            return c
        c.close()
        assert code == 421 and time.monotonic() < deadline, (code, text)
        time.sleep(0.05)


def test_connection_limit_gives_421(tmp_path):
    srv = IntakeServer(smtp_config(tmp_path, "max_connections = 2\n")).start()
    try:
        # The readiness probe's connection may hold a slot for a moment: admitted ones are taken as they come.
        first, second = admitted(srv.port), admitted(srv.port)
        third = RawClient(srv.port)
        code, text = third.reply()
        assert code == 421 and "4.7.0" in text
        third.close()
        first.cmd("QUIT")
        first.close()
        admitted(srv.port).close()  # the slot the first one held is free again
        second.close()
    finally:
        srv.stop()


def test_starttls_with_a_configured_certificate(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("mx.intake.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "mx.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "mx.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    srv = IntakeServer(smtp_config(tmp_path, 'tls_cert = "mx.pem"\ntls_key = "mx.key"\n')).start()
    try:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
            s.ehlo()
            assert s.has_extn("starttls")
            assert s.starttls(context=ctx)[0] == 220
            s.ehlo()
            assert not s.has_extn("starttls")
            assert s.sendmail("alice@customer.example.org", ["support@example.com"],
                              make_mail(subject="over TLS")) == {}
        res = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(srv.port), "-tls", "--tls-verify",
                              "--tls-ca-path", str(tmp_path / "ca.pem"),
                              "--from", "bob@customer.example.org", "--to", "support@example.com",
                              "--header", "Subject: swaks over TLS", "--timeout", "30"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        subjects = sorted(c["subject"] for c in srv.wait_for_cases(2))
        assert subjects == ["over TLS", "swaks over TLS"]
    finally:
        srv.stop()


def test_lmtp_gives_one_reply_per_recipient(tmp_path):
    srv = IntakeServer(smtp_config(tmp_path, 'protocol = "lmtp"\n')).start()
    try:
        c = RawClient(srv.port)
        code, greeting = c.reply()
        assert code == 220 and "LMTP" in greeting
        assert c.cmd("EHLO client")[0] == 500  # LMTP speaks LHLO only
        code, lhlo = c.cmd("LHLO mx.example.org")
        assert code == 250 and "8BITMIME" in lhlo
        assert c.cmd("MAIL FROM:<alice@customer.example.org>")[0] == 250
        assert c.cmd("RCPT TO:<support@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<nobody@example.com>")[0] == 550
        assert c.cmd("RCPT TO:<billing+x@example.com>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(make_mail(subject="over LMTP", to="support@example.com, billing+x@example.com") + b".\r\n")
        first, second = c.reply(), c.reply()
        assert first[0] == 250 and second[0] == 250, (first, second)
        assert c.cmd("QUIT")[0] == 221
        c.close()
        with smtplib.LMTP("127.0.0.1", srv.port, timeout=30) as lm:
            assert lm.sendmail("bob@customer.example.org", ["support@example.com"], make_mail(subject="LMTP two")) == {}
        cases = srv.wait_for_cases(2)
        assert sorted(c["subject"] for c in cases) == ["LMTP two", "over LMTP"]  # support@ + billing@: one case
    finally:
        srv.stop()


def test_port_in_use_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = IntakeServer(smtp_config(tmp_path, port=port))
        res = srv.intake("serve", timeout=60)
    assert res.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr


def test_bad_smtp_config_is_refused_at_load(tmp_path):
    cfg = smtp_config(tmp_path, 'tls_cert = "mx.pem"\n')
    res = IntakeServer(cfg).intake("serve")
    assert res.returncode != 0 and "tls_cert and smtp.tls_key go together" in res.stderr


def test_intake_status_shows_the_listener(tmp_path):
    cfg = smtp_config(tmp_path)
    srv = IntakeServer(cfg)
    before = srv.intake("status", "--json")
    assert before.returncode == 1 and "no database at ./intake.db" in before.stderr
    assert srv.intake("db", "upgrade").returncode == 0
    before = json.loads(srv.intake("status", "--json").stdout)
    assert [(s["name"], s["state"]) for s in before if s["name"] == "smtp"] == [("smtp", "not started")]
    srv.start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
            s.sendmail("alice@customer.example.org", ["support@example.com"], make_mail(subject="status check"))
        deadline = time.monotonic() + 30
        while True:
            line = {s["name"]: s for s in json.loads(srv.intake("status", "--json").stdout)}.get("smtp")
            if (line and line["last_success_at"]) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert line is not None and line["state"] == "listening" and line["last_success_at"]
        assert len(srv.wait_for_cases(1)) == 1  # processed: nothing waits when serve stops
    finally:
        srv.stop()
    after = {s["name"]: s for s in json.loads(srv.intake("status", "--json").stdout)}
    assert after["smtp"]["state"] == "stopped" and after["processor"]["backlog"] == 0


def test_8bit_bytes_in_ehlo_and_mail_from_are_stored_and_do_not_stall_later_mail(server):
    """aiosmtpd hands undecodable bytes of a command on as lone surrogates, which no
    database takes: the message is stored all the same, and so is every one after it."""
    c = RawClient(server.port)
    c.reply()
    assert c.cmd(b"EHLO h\xffst.example\r\n")[0] == 250
    for n, sender in enumerate((b"t\xffro@customer.example.org", b"alice@customer.example.org")):
        assert c.cmd(b"MAIL FROM:<" + sender + b">\r\n")[0] == 250
        assert c.cmd("RCPT TO:<support@example.com>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(make_mail(subject=f"eight-bit envelope {n}") + b"\r\n.\r\n")
        code, text = c.reply()
        assert code == 250, text
    c.cmd("QUIT")
    c.close()
    for n in range(2):
        server.case_with_subject(f"eight-bit envelope {n}")


def test_a_listener_that_cannot_bind_is_not_shown_listening(tmp_path):
    cfg = smtp_config(tmp_path)
    srv = IntakeServer(cfg)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", srv.port))
        taken.listen()
        res = srv.intake("serve", timeout=120)
        assert res.returncode != 0 and "cannot listen" in res.stderr
    line = {s["name"]: s for s in json.loads(srv.intake("status", "--json").stdout)}["smtp"]
    assert line["state"] == "stopped"
