"""A whole conversation through the real ``intake serve``: ten mails over LMTP (as the
company's Postfix delivers them) between a Japanese customer, the agent who answers and a
colleague of the customer in Cc. It must end as one case with the right timeline and
statuses, and the right mails in the outbound folder for the right people.

Also: intake as the MX itself (SMTP), where a pass its own server never wrote is not
believed."""

from __future__ import annotations

import json
import smtplib
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

from mailfactory import TRUSTED_MX, agent_auth
from smtp_fixtures import IntakeServer, smtp_config

TEAM = """\
agents:
  hanako@example.com: {name: 山田 花子, language: ja}
  ken@example.com: {name: Ken Sato, language: en}
queues:
  support: {name: サポート, agents: [hanako@example.com, ken@example.com], assign: none}
  billing: {name: Billing, agents: [hanako@example.com], assign: none}
"""

TARO = ("山田 太郎", "taro@bigcorp.co.jp")
ICHIRO = ("鈴木 一郎", "ichiro@bigcorp.co.jp")
HANAKO = ("山田 花子", "hanako@example.com")


def outside() -> dict[str, str]:
    """The Received our MX writes for mail from the internet (no authentication claimed)."""
    return {"Received": f"from mail.bigcorp.co.jp (mail.bigcorp.co.jp [198.51.100.7]) by {TRUSTED_MX} with ESMTPS; "
                        "Wed, 02 Dec 2026 10:00:00 +0900"}


def mail(sender: tuple[str, str], to: str, subject: str, body: str, *, cc: tuple[str, str] | None = None,
         reply_to: EmailMessage | None = None, trace: dict[str, str] | None = None, charset: str = "utf-8",
         files: list[tuple[str, bytes, str]] = (), headers: dict[str, str] | None = None) -> bytes:
    """A mail as a mail client writes it, below the trace headers our MX adds."""
    m = EmailMessage()
    for k, v in (trace or outside()).items():
        m[k] = v
    m["From"] = f"{sender[0]} <{sender[1]}>"
    m["To"] = to
    if cc:
        m["Cc"] = f"{cc[0]} <{cc[1]}>"
    m["Subject"] = subject
    m["Date"] = "Wed, 02 Dec 2026 10:00:00 +0900"
    m["Message-ID"] = make_msgid(domain=sender[1].rpartition("@")[2])
    if reply_to is not None:
        m["In-Reply-To"] = reply_to["Message-ID"]
        m["References"] = " ".join(filter(None, [reply_to.get("References", ""), reply_to["Message-ID"]]))
    for k, v in (headers or {}).items():
        m[k] = v
    m.set_content(body, charset=charset)
    for name, data, ctype in files:
        maintype, subtype = ctype.split("/")
        m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return m.as_bytes(policy=policy.SMTP)


class Site:
    """intake serve behind the company's MTA: mail is handed over by LMTP, sent mail is read
    from the outbound folder."""

    def __init__(self, srv: IntakeServer, outbound: Path) -> None:
        self.srv, self.outbound = srv, outbound
        self.sent_files: set[str] = set()

    def deliver(self, raw: bytes, rcpt: str) -> None:
        """Hand one mail over and wait until intake has processed it."""
        before = self.processed()
        with smtplib.LMTP("127.0.0.1", self.srv.port, timeout=30) as lm:
            assert lm.sendmail("sender@mx.example.com", [rcpt], raw) == {}
        deadline = time.monotonic() + 30
        while self.processed() == before:
            assert time.monotonic() < deadline, self.srv.log_text()[-3000:]
            time.sleep(0.1)

    def processed(self) -> int:
        rows = json.loads(self.srv.read("messages", "list", "--json").stdout)
        return len([r for r in rows if r["state"] != "received"])

    def new_mails(self, count: int) -> list[EmailMessage]:
        """The next ``count`` mails serve writes to the outbound folder (waits for them), by
        their file names (creation order)."""
        deadline = time.monotonic() + 30
        while True:
            names = sorted(p.name for p in self.outbound.glob("*.eml") if p.name not in self.sent_files)
            if len(names) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(names) == count, (names, [e for e in self.case()["timeline"] if e["type"] == "mail_skipped"])
        self.sent_files.update(names)
        return [message_from_bytes((self.outbound / n).read_bytes(), policy=policy.default) for n in names]

    def case(self) -> dict:
        return json.loads(self.srv.read("cases", "show", "CASE-1", "--json").stdout)


def who(m: EmailMessage) -> tuple[str, list[str], list[str]]:
    """(template-ish subject, To, Cc) addresses of a sent mail."""
    to = [a.addr_spec for a in m["To"].addresses]
    cc = [a.addr_spec for a in m["Cc"].addresses] if m["Cc"] else []
    return str(m["Subject"]), to, cc


def body(m: EmailMessage) -> str:
    return m.get_body(("plain",)).get_content()


def test_ten_mails_between_a_customer_an_agent_and_a_colleague_make_one_case(tmp_path):
    cfg = smtp_config(tmp_path, 'protocol = "lmtp"\n', "interval = 0.2\n", team=TEAM)
    srv = IntakeServer(cfg).start()
    site = Site(srv, tmp_path / "outbox")
    try:
        # 1. The customer writes in ISO-2022-JP, copying a colleague.
        site.deliver(mail(TARO, "support@example.com", "プリンターが印刷できません", "昨日から印刷できません。\n至急対応をお願いします。\n",
                          cc=ICHIRO, charset="iso-2022-jp"), "support@example.com")
        ack, notice_h, notice_k = _by_recipient(site.new_mails(3), "taro@bigcorp.co.jp", "hanako@example.com",
                                                "ken@example.com")
        assert who(ack)[1:] == (["taro@bigcorp.co.jp"], [])  # the ack goes to the customer alone
        assert "[CASE-1]" in who(ack)[0] and "受け付けました" in who(ack)[0]
        assert "昨日から印刷できません。" in body(notice_h) and "New case" in who(notice_k)[0]

        # 2. The agent answers the notice from her mail client: a command, her text, the quote.
        case_address = notice_h["Reply-To"].addresses[0].addr_spec
        site.deliver(mail(HANAKO, case_address, f"Re: {notice_h['Subject']}",
                          "#assign me\nお問い合わせありがとうございます。\nプリンターの型番を教えていただけますか。\n\n山田 花子\n\n"
                          "2026年12月2日(水) 10:00 サポート <support@example.com>:\n> 昨日から印刷できません。\n",
                          reply_to=notice_h, trace=agent_auth()), case_address)
        (reply1,) = site.new_mails(1)
        assert who(reply1)[1:] == (["taro@bigcorp.co.jp"], ["ichiro@bigcorp.co.jp"])
        text = body(reply1)
        assert "プリンターの型番を教えていただけますか。" in text
        assert "#assign" not in text and "> 昨日から" not in text and "2026年12月2日(水) 10:00" not in text
        assert site.case()["status"] == "pending" and site.case()["assignee"] == "hanako@example.com"

        # 3. The customer answers the agent (Gmail's Japanese quote header).
        reply_address = reply1["Reply-To"].addresses[0].addr_spec
        site.deliver(mail(TARO, reply_address, f"Re: {reply1['Subject']}",
                          "LBP-1234 です。\n\n2026年12月2日(水) 10:05 サポート <support@example.com>:\n"
                          "> プリンターの型番を教えていただけますか。\n", cc=ICHIRO, reply_to=reply1), reply_address)
        (told1,) = site.new_mails(1)
        assert who(told1)[1] == ["hanako@example.com"]  # assigned: only she hears of it
        assert "LBP-1234 です。" in body(told1) and "> プリンター" not in body(told1)
        assert site.case()["status"] == "open"

        # 4. The colleague answers all, with the error log.
        log = "ERROR 0x1F ドライバーの応答なし\n".encode()
        site.deliver(mail(ICHIRO, reply_address, f"Re: {reply1['Subject']}", "エラーログを添付します。\n",
                          cc=TARO, reply_to=reply1, files=[("error.log", log, "text/plain")]), reply_address)
        (told2,) = site.new_mails(1)
        assert who(told2)[1] == ["hanako@example.com"] and "鈴木 一郎" in body(told2)
        assert [(p.get_filename(), p.get_payload(decode=True)) for p in told2.iter_attachments()] == [("error.log", log)]

        # 5. The agent writes an internal note: only her colleague hears of it.
        site.deliver(mail(HANAKO, told2["Reply-To"].addresses[0].addr_spec, f"Re: {told2['Subject']}",
                          "#note\nログを見るとドライバーが古いようです。\n", reply_to=told2, trace=agent_auth()),
                     told2["Reply-To"].addresses[0].addr_spec)
        (note,) = site.new_mails(1)
        assert who(note)[1:] == (["ken@example.com"], []) and "ログを見るとドライバーが古いようです。" in body(note)

        # 6. The agent sends the fix as a file, raising the priority.
        manual = "%PDF-1.4 ドライバー更新手順".encode()
        site.deliver(mail(HANAKO, case_address, f"Re: {reply1['Subject']}",
                          "#priority high\nドライバー更新の手順書をお送りします。\n", reply_to=told2, trace=agent_auth(),
                          files=[("ドライバー更新手順.pdf", manual, "application/pdf")]), case_address)
        (reply2,) = site.new_mails(1)
        assert who(reply2)[1:] == (["taro@bigcorp.co.jp"], ["ichiro@bigcorp.co.jp"])
        assert [(p.get_filename(), p.get_payload(decode=True)) for p in reply2.iter_attachments()] == \
            [("ドライバー更新手順.pdf", manual)]
        assert site.case()["status"] == "pending"

        # 7. The colleague's out-of-office answer: kept, answered by nobody, nothing changes.
        site.deliver(mail(ICHIRO, reply_address, f"自動応答: {reply2['Subject']}", "12月5日まで不在です。\n",
                          reply_to=reply2, headers={"Auto-Submitted": "auto-replied"}), reply_address)
        assert site.case()["status"] == "pending"

        # 8. The customer confirms the fix.
        site.deliver(mail(TARO, reply_address, f"Re: {reply2['Subject']}", "更新したら印刷できました。ありがとうございます。\n",
                          cc=ICHIRO, reply_to=reply2), reply_address)
        (told3,) = site.new_mails(1)
        assert who(told3)[1] == ["hanako@example.com"] and "印刷できました" in body(told3)

        # 9. The agent resolves it with the resolution notes and a last word.
        site.deliver(mail(HANAKO, case_address, f"Re: {reply2['Subject']}",
                          "#resolution ドライバーを 2.1 に更新して解決\n#status resolved\nご確認ありがとうございました。\n",
                          reply_to=told3, trace=agent_auth()), case_address)
        reply3, resolved = _by_subject(site.new_mails(2), "Re:")
        assert who(reply3)[1:] == (["taro@bigcorp.co.jp"], ["ichiro@bigcorp.co.jp"])
        assert who(resolved)[1:] == (["taro@bigcorp.co.jp"], [])
        assert "ドライバーを 2.1 に更新して解決" in body(resolved)

        # 10. The agent closes it: commands only, mailed to nobody.
        site.deliver(mail(HANAKO, case_address, f"Re: {reply2['Subject']}", "#status closed\n", reply_to=told3,
                          trace=agent_auth()), case_address)

        # One case, in the right state, with the right history.
        cases = srv.cases()
        assert [(c["number"], c["status"], c["priority"], c["assignee"]) for c in cases] == \
            [("CASE-1", "closed", "high", "hanako@example.com")]
        case = site.case()
        assert case["participants"] == ["ichiro@bigcorp.co.jp", "taro@bigcorp.co.jp"]
        assert case["resolution"] == "ドライバーを 2.1 に更新して解決" and case["closed_at"] and case["resolved_at"]
        statuses = [(e["from"], e["to"], e["actor"]) for e in case["timeline"] if e["type"] == "status"]
        assert statuses == [("new", "pending", "hanako@example.com"), ("pending", "open", "taro@bigcorp.co.jp"),
                            ("open", "pending", "hanako@example.com"), ("pending", "open", "taro@bigcorp.co.jp"),
                            ("open", "resolved", "hanako@example.com"), ("resolved", "closed", "hanako@example.com")]
        came_in = [(e["from"], e["visibility"], e["text"].strip()) for e in case["timeline"]
                   if e["type"] == "message" and e["direction"] == "in"]
        assert [(f, v) for f, v, _ in came_in] == [
            ("taro@bigcorp.co.jp", "public"), ("hanako@example.com", "public"), ("taro@bigcorp.co.jp", "public"),
            ("ichiro@bigcorp.co.jp", "public"), ("hanako@example.com", "internal"), ("hanako@example.com", "public"),
            ("ichiro@bigcorp.co.jp", "public"), ("taro@bigcorp.co.jp", "public"), ("hanako@example.com", "public"),
            ("hanako@example.com", "internal")]
        assert came_in[2][2] == "LBP-1234 です。"  # the quote is not on the timeline
        # Nothing else was queued (mails are queued with the processing each delivery waited
        # for), and no customer ever saw a command or the note.
        queued = json.loads(srv.read("outbox", "list", "--json").stdout)
        assert len(queued) == len(site.sent_files) == 11
        for name in site.sent_files:
            m = message_from_bytes((site.outbound / name).read_bytes(), policy=policy.default)
            if any(a.endswith("@bigcorp.co.jp") for a in who(m)[1] + who(m)[2]):
                assert "#" not in body(m).split("--")[0] and "ドライバーが古い" not in body(m)
    finally:
        srv.stop()


def _by_recipient(mails: list[EmailMessage], *addresses: str) -> list[EmailMessage]:
    by = {who(m)[1][0]: m for m in mails}
    assert sorted(by) == sorted(addresses), list(by)
    return [by[a] for a in addresses]


def _by_subject(mails: list[EmailMessage], first_prefix: str) -> list[EmailMessage]:
    first = [m for m in mails if str(m["Subject"]).startswith(first_prefix)]
    rest = [m for m in mails if m not in first]
    assert len(first) == 1, [who(m) for m in mails]
    return first + rest


def test_as_the_mx_a_pass_our_server_never_wrote_is_not_believed(tmp_path):
    """intake's own listener is the edge: every Authentication-Results a sender brings sits
    below its Received, even one naming our host, so the agent's address alone gets nowhere."""
    cfg = smtp_config(tmp_path, "", "interval = 0.2\n", team=TEAM)
    text = cfg.read_text("utf-8").replace('hostname = "mx.intake.test"', f'hostname = "{TRUSTED_MX}"')
    cfg.write_text(text, "utf-8")
    srv = IntakeServer(cfg).start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
            assert s.sendmail("taro@bigcorp.co.jp", ["support@example.com"],
                              mail(TARO, "support@example.com", "請求書について", "請求書が届きません。\n", trace={})) == {}
        srv.wait_for_cases(1)
        forged = mail(HANAKO, "support@example.com", "Re: [CASE-1] 請求書について",
                      "#status closed\n振込先が変わりました。新しい口座は…\n", trace=agent_auth())
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
            assert s.sendmail("hanako@example.com", ["support@example.com"], forged) == {}
        deadline = time.monotonic() + 30
        while True:
            notices = [m for m in json.loads(srv.read("outbox", "list", "--json").stdout)
                       if m["template"] == "agent_notice"]
            if notices or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert [n["to"] for n in notices] == ["hanako@example.com"]
        case = json.loads(srv.read("cases", "show", "CASE-1", "--json").stdout)
        assert case["status"] == "new"
        sent = json.loads(srv.read("outbox", "list", "--json").stdout)
        assert not [m for m in sent if m["template"] == "agent_reply"]
        inbound = json.loads(srv.read("messages", "show", str(max(r["id"] for r in json.loads(
            srv.read("messages", "list", "--json").stdout))), "--json").stdout)
        checked = next(e for e in inbound["log"] if e["step"] == "classified")
        assert checked["sender"] == "customer" and any("below" in line for line in
                                                       checked["authentication"]["ignored"])
    finally:
        srv.stop()
