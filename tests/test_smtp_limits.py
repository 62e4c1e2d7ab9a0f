"""What one SMTP client can hold, and what it is told (issue 15), over real sockets to a real
``intake serve``: a command line is at most ``max_command_line`` (4 KB) and costs no memory
however long it is sent, while a message's lines may be as long as a message; connections
per client address, a session's time and its pauses are limited; a path over 256 octets and
control characters are refused with clear codes; every refusal is counted in ``intake
status``, and nothing a client sends reaches serve.log unescaped."""

from __future__ import annotations

import json
import re
import smtplib
import threading
import time

import pytest
from mailfactory import make_mail
from smtp_fixtures import IntakeServer, PeakRss, RawClient, smtp_config


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> IntakeServer:
    """serve with the ``[smtp]`` defaults."""
    srv = IntakeServer(smtp_config(tmp_path_factory.mktemp("limits"))).start()
    yield srv
    srv.stop()




def test_a_command_line_over_4_kb_gets_500_5_5_2_and_holds_no_memory(server):
    """95 connections sending 24 MB EHLO lines took serve from 83 MB to 2.4 GB, never given
    back. Twenty 8 MB lines in flight at once now leave serve's memory where it was; each
    is answered 500 5.5.2 once it ends, and the session goes on."""
    line = b"x" * (8 * 1024 * 1024)
    clients = [RawClient(server.port) for _ in range(20)]
    try:
        for c in clients:
            assert c.reply()[0] == 220
        before = server.rss_mib()
        with PeakRss(server.proc.pid) as rss:
            for c in clients:
                c.send(b"EHLO " + line)  # no line end yet: the line is still coming
            replies = []
            for c in clients:
                c.send(b"\r\n")
                replies.append(c.reply())
        grown = rss.peak - before
        assert grown < 32, f"serve grew by {grown:.0f} MiB reading 160 MiB of command lines"
        assert {text for _, text in replies} == {"500 5.5.2 line too long"}
        for c in clients:
            assert c.cmd("EHLO client.example.org")[0] == 250
    finally:
        for c in clients:
            c.close()


def test_a_command_line_of_4096_octets_is_accepted_and_one_more_is_not(server):
    c = RawClient(server.port)
    try:
        assert c.reply()[0] == 220
        longest = b"NOOP " + b"x" * (4096 - len(b"NOOP \r\n")) + b"\r\n"
        assert len(longest) == 4096
        assert c.cmd(longest)[0] == 250
        assert c.cmd(longest[:-2] + b"x\r\n") == (500, "500 5.5.2 line too long")
        assert c.cmd("NOOP")[0] == 250
    finally:
        c.close()


def test_a_message_line_may_be_far_longer_than_a_command_line(server):
    """Real mail has lines far over 1000 octets (unwrapped HTML): a 1 MB line is accepted."""
    raw = make_mail(subject="one megabyte line", body="B" * 1_000_000 + "\n")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as s:
        assert s.sendmail("alice@customer.example.org", ["support@example.com"], raw) == {}
    case = server.case_with_subject("one megabyte line")
    detail = json.loads(server.intake("cases", "show", case["number"], "--json").stdout)
    assert any("B" * 100_000 in (e.get("text") or "") for e in detail["timeline"])


def test_message_memory_is_bounded_by_the_message_size_and_given_back(tmp_path):
    """Three rounds of twenty concurrent sessions, ten sending a 3.5 MB message in one
    line (accepted) and ten an oversize 6 MB line (552): serve holds at most a few times
    the message size limit per session, and after each round it is back near where it
    started (the buffers are returned, so rounds do not add up)."""
    srv = IntakeServer(smtp_config(tmp_path, 'max_message_size = "4MB"\n')).start()
    try:
        ok = make_mail(subject="big", body="C" * 3_500_000 + "\n")
        oversize = make_mail(subject="too big", body="D" * 6_000_000 + "\n")
        before = srv.rss_mib()
        after_rounds, peaks = [], []
        for n in range(3):
            replies: list[str] = []

            def send(raw: bytes) -> None:
                c = RawClient(srv.port)
                try:
                    c.transaction()
                    c.send(raw + b".\r\n")
                    replies.append(c.reply()[1][:9])
                    c.cmd("QUIT")
                finally:
                    c.close()

            with PeakRss(srv.proc.pid) as rss:
                threads = [threading.Thread(target=send, args=(raw,)) for raw in [ok] * 10 + [oversize] * 10]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=120)
            assert sorted(replies) == ["250 2.0.0"] * 10 + ["552 5.3.4"] * 10, replies
            peaks.append(rss.peak - before)
            after_rounds.append(srv.rss_mib() - before)
        # 20 sessions x 4 MB: a session holds its message and the line being read, ~3x the limit at most.
        assert max(peaks) < 20 * 3 * 4, f"peaks {peaks} MiB"
        assert max(after_rounds) < 64, f"after each round: {after_rounds} MiB over the start"
    finally:
        srv.stop()


def test_one_client_holding_connections_leaves_room_for_others(server):
    """One client opening 100 connections (and keeping them alive with NOOP) used to keep
    every other client at 421. It now gets 50 (``max_connections_per_ip``), the rest
    ``421 4.7.0``, and mail from elsewhere is delivered beside it."""
    hog = [RawClient(server.port, source="127.0.0.2") for _ in range(100)]
    try:
        replies = [c.reply() for c in hog]
        held = [c for c, (code, _) in zip(hog, replies) if code == 220]
        refused = [text for code, text in replies if code != 220]
        assert len(held) == 50
        assert len(refused) == 50 and all(t.startswith("421 4.7.0 ") for t in refused), refused[:3]
        for c in held:
            assert c.cmd("NOOP")[0] == 250
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
            assert s.sendmail("alice@customer.example.org", ["support@example.com"],
                              make_mail(subject="beside a connection hog")) == {}
        server.case_with_subject("beside a connection hog")
    finally:
        for c in hog:
            c.close()


def test_idle_clients_are_told_and_closed_in_the_command_and_the_data_phase(tmp_path):
    """A client that says nothing is closed with ``421 4.4.2`` after ``command_timeout``;
    one that stops in the middle of a message after ``data_timeout``. The DATA timeout
    counts pauses, not the whole transfer: a message sent slowly but steadily, for
    longer than the timeout in all, is delivered."""
    srv = IntakeServer(smtp_config(tmp_path, 'command_timeout = "1s"\ndata_timeout = "2s"\n')).start()
    try:
        quiet = RawClient(srv.port, timeout=30)
        assert quiet.reply()[0] == 220
        code, text = quiet.reply()  # nothing sent: the next thing heard is the timeout
        assert code == 421 and text.startswith("421 4.4.2 mx.intake.test "), text
        with pytest.raises(ConnectionError):
            quiet.reply()
        quiet.close()

        stalled = RawClient(srv.port, timeout=30)
        stalled.transaction()
        stalled.send(make_mail(subject="stalled")[:200])
        code, text = stalled.reply()
        assert code == 421 and text.startswith("421 4.4.2 "), text
        stalled.close()

        steady = RawClient(srv.port, timeout=30)
        steady.transaction()
        raw = make_mail(subject="slow but steady")
        step = len(raw) // 8 + 1
        for i in range(0, len(raw), step):  # 8 pieces, 0.5 s apart: 4 s in all, no pause of 2 s
            steady.send(raw[i:i + step])
            time.sleep(0.5)
        steady.send(b".\r\n")
        code, text = steady.reply()
        assert code == 250, text
        steady.close()
        srv.case_with_subject("slow but steady")
        assert srv.wait_for_refusals({"idle timeout": 1, "data timeout": 1}) == {"idle timeout": 1,
                                                                                "data timeout": 1}
    finally:
        srv.stop()


def test_a_data_timeout_shorter_than_the_command_timeout_acts_on_its_own(tmp_path):
    srv = IntakeServer(smtp_config(tmp_path, 'command_timeout = "60s"\ndata_timeout = "1s"\n')).start()
    try:
        stalled = RawClient(srv.port, timeout=30)
        stalled.transaction()
        stalled.send(make_mail(subject="stalled")[:200])
        code, text = stalled.reply()  # well before the 60 s of the command timeout
        assert code == 421 and text.startswith("421 4.4.2 "), text
        stalled.close()
        assert srv.wait_for_refusals({"data timeout": 1}) == {"data timeout": 1}
    finally:
        srv.stop()


def test_a_session_ends_after_max_session_time_however_busy(tmp_path):
    """A client keeping its connection alive with NOOPs (never idle) is closed after
    ``max_session_time`` with ``421 4.4.2``; a new session is welcome."""
    srv = IntakeServer(smtp_config(tmp_path, 'max_session_time = "2s"\n')).start()
    try:
        c = RawClient(srv.port, timeout=30)
        assert c.reply()[0] == 220
        answered = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            code, text = c.cmd("NOOP")
            if code != 250:
                break
            answered += 1
            time.sleep(0.2)
        assert code == 421 and text.startswith("421 4.4.2 mx.intake.test ") and "Session time" in text, text
        assert answered >= 3  # it was a live session that was cut, not one refused at once
        c.close()
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
            assert s.sendmail("alice@customer.example.org", ["support@example.com"],
                              make_mail(subject="after a long session")) == {}
        srv.case_with_subject("after a long session")
        assert srv.wait_for_refusals({"session time": 1})["session time"] == 1
    finally:
        srv.stop()


def test_a_path_over_256_octets_gets_501(server):
    """A 1,500-character MAIL FROM was answered ``500 Command line too long``: now a clear
    ``501`` (RFC 5321 4.5.3.1.3: a path is at most 256 octets, angle brackets included)."""
    c = RawClient(server.port)
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example.org")[0] == 250
        assert c.cmd("MAIL FROM:<" + "a" * 1500 + "@customer.example.org>") == (
            501, "501 5.1.7 Path too long (RFC 5321 allows 256 octets)")
        longest = "a" * (254 - len("@customer.example.org")) + "@customer.example.org"
        assert c.cmd(f"MAIL FROM:<a{longest}>")[0] == 501  # 257 octets
        assert c.cmd(f"MAIL FROM:<{longest}>")[0] == 250  # 256 octets
        assert c.cmd("RCPT TO:<support+" + "x" * 300 + "@example.com>") == (
            501, "501 5.1.3 Path too long (RFC 5321 allows 256 octets)")
        assert c.cmd("RCPT TO:<support@example.com>")[0] == 250
    finally:
        c.close()


# Bytes that must never reach a log file raw: C0 controls but TAB and LF, and DEL.
_RAW_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


def test_control_characters_are_refused_at_once_and_never_reach_serve_log(server):
    """A NUL in an envelope can never become valid: refused at MAIL/RCPT with a permanent
    5xx (not a 451 for ever). A CR in the EHLO name would end a line of our Received:
    header. What the listener logs of them is escaped."""
    c = RawClient(server.port)
    try:
        assert c.reply()[0] == 220
        code, text = c.cmd(b"EHLO a\rAuthentication-Results: mx.example.com; dkim=pass\r\n")
        assert (code, text) == (501, "501 5.5.2 Syntax error: control character in the host name")
        assert c.cmd(b"EHLO ok.example\x00org\r\n")[0] == 501
        assert c.cmd("EHLO client.example.org")[0] == 250
        assert c.cmd(b"MAIL FROM:<p\x00@b.test>\r\n") == (501, "501 5.1.7 Bad sender address syntax: control character")
        assert c.cmd("MAIL FROM:<p@b.test>")[0] == 250
        assert c.cmd(b"RCPT TO:<support+\x00\x1b@example.com>\r\n") == (
            501, "501 5.1.3 Bad recipient address syntax: control character")
        assert c.cmd(b"\x1b[31mFAKE\x07 command\r\n")[0] == 500
    finally:
        c.close()
    log = server.wait_for_log("unrecognized command")
    assert "EHLO ok.example\\x00org" in log and "MAIL FROM:<p\\x00@b.test>" in log
    assert "RCPT TO:<support+\\x00\\x1b@example.com>" in log and "\\x1b[31MFAKE\\x07" in log
    raw = server.log.read_bytes()
    assert not _RAW_CONTROL.search(raw), _RAW_CONTROL.search(raw)


def test_intake_status_counts_refusals_by_reason(tmp_path):
    srv = IntakeServer(smtp_config(tmp_path, 'max_message_size = "10KB"\nmax_connections = 6\n'
                                             'max_connections_per_ip = 2\n')).start()
    try:
        c = RawClient(srv.port)
        assert c.reply()[0] == 220
        assert c.cmd("EHLO " + "x" * 5000)[0] == 500
        assert c.cmd("EHLO client.example.org")[0] == 250
        assert c.cmd("FROB")[0] == 500
        assert c.cmd("MAIL FROM:<alice@customer.example.org> SIZE=50000")[0] == 552
        assert c.cmd("MAIL FROM:<alice@customer.example.org>")[0] == 250
        assert c.cmd("RCPT TO:<nobody@example.com>")[0] == 550
        assert c.cmd("RCPT TO:<support@example.com>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(make_mail(subject="too big", body="x" * 20_000 + "\n") + b".\r\n")
        assert c.reply()[0] == 552
        # Two sessions from 127.0.0.3 are its share; the third and fourth are refused.
        third = [RawClient(srv.port, source="127.0.0.3") for _ in range(4)]
        assert [x.reply()[0] for x in third] == [220, 220, 421, 421]
        # 1 + 2 sessions open: three more fill the listener, the next is refused.
        others = [RawClient(srv.port, source=f"127.0.0.{n}") for n in (4, 5, 6)]
        assert [x.reply()[0] for x in others] == [220, 220, 220]
        full = RawClient(srv.port, source="127.0.0.7")
        code, text = full.reply()
        assert code == 421 and "Too many connections, please retry later" in text
        for x in [c, *third, *others, full]:
            x.close()
        expected = {"line too long": 1, "unrecognized command": 1, "too big": 2, "unknown recipient": 1,
                    "per-IP limit": 2, "connection limit": 1}
        assert srv.wait_for_refusals(expected) == expected
        text = srv.intake("status").stdout
        assert "listening; 8 refused" in text
        assert ("smtp refused: connection limit 1, line too long 1, per-IP limit 2, too big 2, unknown recipient 1, "
                "unrecognized command 1") in text.splitlines()
    finally:
        srv.stop()


def test_lmtp_takes_mail_only_from_the_sites_own_mail_servers(tmp_path):
    # Mail handed over by LMTP is judged by the MTA's headers (an agent's
    # Authentication-Results): a client from elsewhere could write those itself.
    srv = IntakeServer(smtp_config(tmp_path, 'protocol = "lmtp"\nlmtp_clients = ["127.0.0.1", "127.0.0.4/30"]\n')).start()
    try:
        outsider = RawClient(srv.port, source="127.0.0.2")
        code, text = outsider.reply()
        assert code == 554 and "5.7.1" in text
        outsider.close()
        for source in ("127.0.0.1", "127.0.0.5"):  # listed: an address, and one of a network
            mta = RawClient(srv.port, source=source)
            assert mta.reply()[0] == 220
            assert mta.cmd("LHLO mx.example.com")[0] == 250
            mta.close()
        assert srv.wait_for_refusals({"not an LMTP client": 1}, name="lmtp") == {"not an LMTP client": 1}
        assert "refused (not an LMTP client) from 127.0.0.2" in srv.log_text()
    finally:
        srv.stop()


def test_a_bad_lmtp_client_entry_is_refused_with_its_place(tmp_path, run_intake):
    path = smtp_config(tmp_path, 'protocol = "lmtp"\nlmtp_clients = ["mx.example.com"]\n')
    res = run_intake("status", config=path)
    assert res.returncode != 0
    assert "smtp.lmtp_clients: 'mx.example.com' is not an IP address or network" in res.stderr
