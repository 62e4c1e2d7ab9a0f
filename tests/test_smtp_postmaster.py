"""postmaster@ each of our domains, and a bare ``postmaster`` (RFC 5321 4.5.1 requires
accepting it), is a mailbox whose mail becomes a case in ``[cases] postmaster_queue``."""

from __future__ import annotations

import json
import smtplib

import pytest
from mailfactory import make_mail
from smtp_fixtures import IntakeServer, RawClient, smtp_config

from intake.config import Config, load_config


def test_postmaster_of_each_of_our_domains_is_a_mailbox(tmp_path):
    cfg_path = smtp_config(tmp_path, '[[mailbox]]\naddress = "help@example.jp"\nqueue = "support-ja"\n'
                                     'brand = "acme-jp"\nlanguage = "ja"\n'
                                     '[cases]\npostmaster_queue = "abuse"\n')
    cfg = load_config(cfg_path)
    mb = cfg.mailbox_for("Postmaster@Example.JP")
    assert (mb.address, mb.queue, mb.brand, mb.language) == ("postmaster@example.jp", "abuse", "acme-jp", "ja")
    assert cfg.mailbox_for("postmaster+c12-abc@example.com").address == "postmaster@example.com"
    assert cfg.mailbox_for("postmaster@example.org") is None  # not one of our domains
    assert cfg.mailbox_for("postmaster") is None  # the listener gives it a domain
    assert Config().cases.postmaster_queue == "support"


def test_a_configured_postmaster_mailbox_wins(tmp_path):
    cfg = load_config(smtp_config(tmp_path, '[[mailbox]]\naddress = "postmaster@example.com"\nqueue = "tier2"\n'))
    assert cfg.mailbox_for("postmaster@example.com").queue == "tier2"


@pytest.mark.parametrize("rcpt", ["postmaster", "PostMaster@Example.com"])
def test_mail_to_postmaster_becomes_a_case_in_the_postmaster_queue(tmp_path, rcpt):
    srv = IntakeServer(smtp_config(tmp_path, '[cases]\npostmaster_queue = "billing"\n')).start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
            s.ehlo("client.example.org")
            s.mail("reporter@customer.example.org")
            code, text = s.rcpt(rcpt)
            assert code == 250, text
            assert s.rcpt("postmaster@example.org") == (550, b"5.1.1 <postmaster@example.org>: no such mailbox here")
            code, _ = s.data(make_mail(subject="your server bounces our mail", to="postmaster@example.com"))
            assert code == 250
        cases = srv.wait_for_cases(1)
        assert [(c["subject"], c["queue"], c["mailbox"]) for c in cases] == [
            ("your server bounces our mail", "billing", "postmaster@example.com")]
        shown = json.loads(srv.intake("cases", "show", cases[0]["number"], "--json").stdout)
        assert shown["participants"] == ["alice@customer.example.org"]  # the sender; our own address is none
    finally:
        srv.stop()


def test_lmtp_accepts_postmaster_too(tmp_path):
    srv = IntakeServer(smtp_config(tmp_path, 'protocol = "lmtp"\n')).start()
    try:
        c = RawClient(srv.port)
        assert c.reply()[0] == 220
        assert c.cmd("LHLO mx.example.org")[0] == 250
        assert c.cmd("MAIL FROM:<reporter@customer.example.org>")[0] == 250
        assert c.cmd("RCPT TO:<postmaster>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(make_mail(subject="postmaster over LMTP") + b".\r\n")
        assert c.reply()[0] == 250
        c.close()
        assert [(x["subject"], x["queue"]) for x in srv.wait_for_cases(1)] == [("postmaster over LMTP", "support")]
    finally:
        srv.stop()
