"""A case's life after intake (DESIGN 5): who counts as an agent, mail commands, notes, the
statuses, reopening and follow-ups, merges and links, participants and files. Mail goes in
as ``intake serve`` stores it; what comes out is read from the outbox, as it would be sent."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest
from conftest import (case_detail, case_ops, case_record, inbound_detail, list_cases, open_test_app, outbox_items,
                      write_config)
from mailfactory import TRUSTED_MX, agent_auth, make_mail

from intake.db import utcnow
from intake.edges.outbox_sender import build_mime, read_files
from intake.threads import reply_address

TEAM = """\
agents:
  hanako@example.com: {name: 山田 花子, language: ja}
  ken@example.com: {name: Ken Sato, language: en}
  jiro@example.com: {name: 鈴木 次郎, language: ja}
queues:
  support: {name: Support, agents: [hanako@example.com, ken@example.com], assign: none, reopen_days: 3}
  billing: {name: Billing, agents: [hanako@example.com, jiro@example.com], assign: none, reply_status: open,
            resolved_notice: false}
  sales: {name: Sales, agents: [ken@example.com], assign: none, on_reply_to_closed: new_case}
"""

HANAKO = "山田 花子 <hanako@example.com>"
CUSTOMER = "山田 太郎 <taro@bigcorp.co.jp>"


@pytest.fixture
def app(tmp_path):
    a = open_test_app(write_config(tmp_path, "[cases]\nmax_participants = 3\n[notify]\nattach_max = \"1KB\"\n",
                                   team=TEAM))
    yield a
    a.close()


def ingest(app, raw: bytes, mailbox: str = "support@example.com", envelope_to: list[str] | None = None):
    """Store a mail as ``intake serve`` does and process it; its outcome."""
    rid = app.store.receive(raw, channel="email", mailbox=mailbox, envelope_to=envelope_to or [mailbox])
    outcome = app.processor.process(rid)
    ingest.last = rid
    return outcome


def open_case(app, subject: str = "プリンターが動きません", body: str = "昨日から印刷できません。\n", **kw) -> str:
    """A customer's first mail; the new case's label."""
    kw.setdefault("sender", CUSTOMER)
    mailbox = kw.pop("mailbox", "support@example.com")
    kw.setdefault("to", mailbox)
    return ingest(app, make_mail(subject=subject, body=body, **kw), mailbox=mailbox).case_number


def agent_writes(app, label: str, body: str, *, sender: str = HANAKO, auth: dict | None = None, to: str | None = None,
                 files: list[tuple[str, bytes, str]] = (), headers: dict | None = None):
    """An agent's mail on a case (the case number in the subject), authenticated by our MX
    unless ``auth`` says otherwise; ``files`` are (name, bytes, type)."""
    domain = sender.rpartition("@")[2].rstrip(">")
    trace = agent_auth(domain) if auth is None else auth
    subject = f"Re: [{label}] プリンターが動きません"
    to = to or "support@example.com"
    if not files:
        raw = make_mail(subject=subject, sender=sender, to=to, body=body, headers={**trace, **(headers or {})})
    else:
        raw = mail_with_files(subject=subject, sender=sender, to=to, body=body, files=files,
                              headers={**trace, **(headers or {})})
    return ingest(app, raw, envelope_to=[to] if "@" in to and to != "support@example.com" else None)


def mail_with_files(*, subject: str, sender: str, to: str, body: str, files, headers: dict | None = None,
                    cc: str | None = None) -> bytes:
    m = EmailMessage()
    for k, v in (headers or {}).items():
        m[k] = v
    m["From"], m["To"], m["Subject"] = sender, to, subject
    if cc:
        m["Cc"] = cc
    m["Date"] = "Fri, 20 Nov 2026 10:00:00 +0900"
    m.set_content(body)
    for name, data, ctype in files:
        maintype, subtype = ctype.split("/")
        m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return m.as_bytes(policy=policy.SMTP)


def case(app, label: str) -> dict:
    found = case_detail(app, label)
    assert found is not None, label
    return found


def sent(app, template: str | None = None, to: str | None = None) -> list:
    """Outbox mails, oldest first, of one template and/or to one recipient."""
    return [i for i in outbox_items(app) if (template is None or i.template == template)
            and (to is None or to in i.recipients)]


def events(app, label: str, type_: str) -> list[dict]:
    return [e for e in case(app, label)["timeline"] if e["type"] == type_]


def mime(app, item):
    """An outbox mail as the relay gets it, files included."""
    return message_from_bytes(build_mime(item, files=read_files(app.store, item)), policy=policy.default)


# -- who is an agent --------------------------------------------------------------------------

FORGED_BELOW_OUR_RECEIVED = {  # the sender wrote a pass for our MX into its own headers
    "Received": "from mail.attacker.example (mail.attacker.example [203.0.113.9]) by mx.example.com with ESMTPS; "
                "Fri, 20 Nov 2026 10:00:05 +0900",
    "X-Spam": "no",
    "Authentication-Results": "mx.example.com; dkim=pass header.d=example.com; spf=pass smtp.mailfrom=example.com",
}


@pytest.mark.parametrize("auth,why", [
    ({}, "no Authentication-Results"),
    ({"Authentication-Results": "mx.attacker.example; dkim=pass header.d=example.com",
      "Received": f"from a (a [203.0.113.9]) by {TRUSTED_MX} with ESMTPS; Fri, 20 Nov 2026 10:00:05 +0900"},
     "not in [security] trusted_authserv_ids"),
    (FORGED_BELOW_OUR_RECEIVED, "below"),
    (agent_auth("attacker.example"), "attacker.example"),  # a pass, but for another domain
    ({"Authentication-Results": f"{TRUSTED_MX}; dkim=fail header.d=example.com; spf=softfail "
                                "smtp.mailfrom=example.com",
      "Received": f"from a (a [203.0.113.9]) by {TRUSTED_MX} with ESMTPS; Fri, 20 Nov 2026 10:00:05 +0900"},
     "example.com"),
], ids=["no-header", "untrusted-authserv", "forged-below-our-received", "unaligned-domain", "dkim-fail"])
def test_a_forged_agent_mail_reaches_no_customer_and_changes_nothing(app, auth, why):
    label = open_case(app)
    before = {i.id for i in outbox_items(app)}
    out = agent_writes(app, label, "#status resolved\n#assign me\nお支払いは不要です。振込先を変更しました。\n", auth=auth)
    new = [i for i in outbox_items(app) if i.id not in before]
    # Nothing reaches the customer; the customer's case did not change and did not get the mail:
    # a case number in the subject is no evidence from a stranger, and an unproven agent is one.
    assert not [i for i in new if "taro@bigcorp.co.jp" in i.recipients]
    c = case(app, label)
    assert c["status"] == "new" and c["assignee"] is None and c["participants"] == ["taro@bigcorp.co.jp"]
    assert out.case_number == "CASE-2" and case(app, "CASE-2")["requester"] == "hanako@example.com"
    assert [link["case"] for link in case(app, "CASE-2")["links"]] == [label]
    # The mail is kept saying why; the agent is told why and how to fix it.
    msg = [e for e in case(app, "CASE-2")["timeline"] if e["type"] == "message" and e["direction"] == "in"]
    assert len(msg) == 1 and msg[0]["from"] == "hanako@example.com"
    checked = next(e for e in inbound_detail(app, str(ingest.last))["log"] if e["step"] == "classified")
    assert checked["sender"] == "customer" and not checked["authentication"]["passed"]
    assert why in " ".join([checked["authentication"]["reason"], *checked["authentication"]["ignored"]])
    notices = [i for i in new if i.template == "agent_notice"]
    assert [i.recipient for i in notices] == ["hanako@example.com"]
    assert "担当者本人からのものと確認できませんでした" in notices[0].text
    assert checked["authentication"]["reason"] in notices[0].text and "対処方法" in notices[0].text


@pytest.mark.parametrize("status,closed_days_ago", [("resolved", 0), ("closed", 1), ("closed", 60)])
def test_a_forged_agent_mail_on_the_case_thread_reopens_nothing(app, status, closed_days_ago):
    """By the case's signed address (which every customer of the case has), the forged mail
    joins the case as a customer's comment, and changes nothing else."""
    label = open_case(app)
    with case_ops(app, utcnow() - timedelta(days=closed_days_ago)) as ops:
        ops.set_status(ops.tx.cases.by_number(1), status, actor="hanako@example.com")
    before = {i.id for i in outbox_items(app)}
    signed = reply_address("support@example.com", 1, app.processor.secret, "c")
    out = ingest(app, make_mail(subject="Re: [CASE-1] プリンター", sender=HANAKO, to=signed,
                                body="#status open\nお振込先が変わりました。\n"), envelope_to=[signed])
    new = [i for i in outbox_items(app) if i.id not in before]
    if closed_days_ago > 3:  # past reopen_days: like any customer's, a follow-up case
        assert out.case_number == "CASE-2"
    else:
        assert out.case_number == label
        came_in = [e for e in case(app, label)["timeline"] if e["type"] == "message" and e["direction"] == "in"]
        # Kept as written, command line included: it shows what was tried.
        assert came_in[-1]["unauthenticated"] and came_in[-1]["text"].strip() == "#status open\nお振込先が変わりました。"
    assert case(app, label)["status"] == status  # not reopened, the command not applied
    assert [(i.template, i.recipient) for i in new if i.template != "new_case_agent" and i.template != "ack"] == \
        [("agent_notice", "hanako@example.com")]
    assert not [i for i in new if i.template == "ack" and i.recipient == "taro@bigcorp.co.jp"]


def test_notices_about_mail_in_an_agents_name_are_rate_limited(app):
    label = open_case(app)
    signed = reply_address("support@example.com", 1, app.processor.secret, "c")
    for n in range(14):
        ingest(app, make_mail(subject="Re: プリンター", sender=HANAKO, to=signed, body=f"偽物 {n}\n"),
               envelope_to=[signed])
    assert len(sent(app, "agent_notice", "hanako@example.com")) == 10  # notices_per_agent_per_hour
    skipped = [e for e in events(app, label, "mail_skipped") if e["template"] == "agent_notice"]
    assert len(skipped) == 4 and {e["check"] for e in skipped} == {"notice-rate"}
    assert case(app, label)["status"] == "new"


def test_a_forged_agent_mail_to_the_signed_case_address_is_refused_too(app):
    label = open_case(app)
    signed = reply_address("support@example.com", 1, app.processor.secret, "c")
    ingest(app, make_mail(subject="Re: プリンター", sender=HANAKO, to=signed, body="#status closed\n閉じます。\n"),
           envelope_to=[signed])
    assert case(app, label)["status"] == "new"
    assert not sent(app, "agent_reply")
    assert [i.recipient for i in sent(app, "agent_notice")] == ["hanako@example.com"]


def test_the_genuine_agent_is_believed_and_the_check_is_on_the_processing_log(app, run_intake):
    label = open_case(app)
    agent_writes(app, label, "ドライバーを更新してください。\n")
    assert [i.recipient for i in sent(app, "agent_reply")] == ["taro@bigcorp.co.jp"]
    shown = run_intake("messages", "show", str(ingest.last), check=True).stdout
    assert "agent authentication: passed: dkim=pass for example.com from mx.example.com" in shown


def test_an_unauthenticated_agent_mail_opening_a_case_is_a_customers_case_and_the_agent_hears_why(app):
    label = ingest(app, make_mail(subject="Test", sender="Ken Sato <ken@example.com>", body="#priority urgent\nHi\n")
                   ).case_number
    c = case(app, label)
    assert c["requester"] == "ken@example.com" and c["priority"] == "medium"
    notice = sent(app, "agent_notice", "ken@example.com")
    assert len(notice) == 1 and "could not be confirmed as yours" in notice[0].text


def test_parse_shows_why_an_agents_mail_is_not_believed(app, run_intake, tmp_path):
    eml = tmp_path / "forged.eml"
    eml.write_bytes(make_mail(subject="x", sender=HANAKO, headers=FORGED_BELOW_OUR_RECEIVED))
    shown = run_intake("parse", str(eml), check=True).stdout
    assert "sender customer" in shown and "not authenticated" in shown
    assert "Agent auth  failed:" in shown and "Agent auth  set aside:" in shown


# -- threading: which case a mail joins (DESIGN 5) ---------------------------------------------

THREAD_INDEX = base64.b64encode(bytes(range(22))).decode()


def _threading_cases(app) -> dict:
    """Ways a mail may name CASE-1, each with the method intake should report."""
    ack = sent(app, "ack")[0]
    signed = reply_address("support@example.com", 1, app.processor.secret, "c")
    local, _, domain = signed.partition("@")
    forged = f"{local[:-3]}{'zzz' if not local.endswith('zzz') else 'yyy'}@{domain}"  # a wrong signature
    return {
        "signed-address": (dict(subject="別件", to=signed), [signed], "signed-address"),
        "references": (dict(subject="Re: 受付", headers={"In-Reply-To": f"<{ack.message_id}>"}), None, "references"),
        "thread-index": (dict(subject="RE: プリンター", headers={"Thread-Index": base64.b64encode(
            bytes(range(22)) + b"\x01\x02\x03\x04\x05").decode()}), None, "thread-index"),
        "token-participant": (dict(subject="Re: [CASE-1] プリンター"), None, "subject-token"),
        "token-same-organization": (dict(subject="Re: [CASE-1] プリンター", sender="佐藤 <sato@bigcorp.co.jp>"), None,
                                    "subject-token"),
        "token-stranger": (dict(subject="Re: [CASE-1] プリンター", sender="Mallory <m@attacker.example>"), None, "new"),
        "forged-signed-address": (dict(subject="別件", to=forged), [forged], "new"),
    }


@pytest.mark.parametrize("way", ["signed-address", "references", "thread-index", "token-participant",
                                 "token-same-organization", "token-stranger", "forged-signed-address"])
def test_each_way_of_naming_a_case_joins_it_only_with_evidence(app, way):
    open_case(app, headers={"Thread-Index": THREAD_INDEX})
    kw, envelope, method = _threading_cases(app)[way]
    kw = {"sender": CUSTOMER, "body": "追加の情報です。\n", **kw}
    out = ingest(app, make_mail(**kw), envelope_to=envelope)
    threaded = next(e for e in inbound_detail(app, str(ingest.last))["log"] if e["step"] == "threaded")
    assert threaded["method"] == method
    if method == "new":
        assert out.case_number == "CASE-2"
        # A stranger's token leaves a link on both cases; a forged address names no case at all.
        links = [link["case"] for link in case(app, "CASE-2")["links"]]
        assert links == (["CASE-1"] if way == "token-stranger" else [])
    else:
        assert out.case_number == "CASE-1" and len(list_cases(app)) == 1
    came_in = [e["text"].strip() for e in case(app, out.case_number)["timeline"]
               if e["type"] == "message" and e["direction"] == "in"]
    assert came_in[-1] == "追加の情報です。"


# -- mail commands ----------------------------------------------------------------------------

@pytest.mark.parametrize("commands,field,value", [
    ("#status open", "status", "open"),
    ("＃ステータス 解決済み", "status", "resolved"),
    ("#priority urgent", "priority", "urgent"),
    ("#優先度 高", "priority", "high"),
    ("#assign ken@example.com", "assignee", "ken@example.com"),
    ("#assign me", "assignee", "hanako@example.com"),
    ("#assign me\n#assign none", "assignee", None),
    ("#queue billing", "queue", "billing"),
    ("#category hardware", "category", "hardware"),
    ("#tag vip\n\n#tag 至急", "tags", ["vip", "至急"]),
    ("#tag vip\n#untag vip", "tags", []),
    ("#resolution ドライバーを更新して解決", "resolution", "ドライバーを更新して解決"),
])
def test_each_command_is_a_case_operation_by_the_agent_and_never_reaches_the_customer(app, commands, field, value):
    label = open_case(app)
    agent_writes(app, label, f"{commands}\nご不便をおかけしております。\n")
    c = case(app, label)
    assert c[field] == value
    changed = [e for e in c["timeline"] if e["type"] in ("status", "priority", "assignee", "queue", "category",
                                                         "tags", "resolution") and e["actor"] != "rules"]
    assert changed and all(e["actor"] == "hanako@example.com" for e in changed)
    reply = sent(app, "agent_reply")
    assert len(reply) == 1 and "ご不便をおかけしております。" in reply[0].text
    assert "#" not in reply[0].text.split("--")[0] and "＃" not in reply[0].text
    assert not sent(app, "agent_notice")  # nothing refused


REFUSALS = [
    ("#stauts resolved", "did you mean #status?"),
    ("#status done", "'done' is not a status"),
    ("#status", "#status needs a value"),
    ("#priority 5", "'5' is not a priority"),
    ("#assign bob", "'bob' is not an agent's address, me or none"),
    ("#assign stranger@elsewhere.example", "stranger@elsewhere.example is not an agent"),
    ("#queue nosuch", "no queue 'nosuch' (queues: billing, sales, support)"),
    ("#tag two words", "one word, without spaces"),
    ("#untag never", "has no tag 'never'"),
    ("#merge CASE-99", "no case CASE-99"),
    ("#merge yesterday", "'yesterday' is not a case number"),
    ("#merge FOO-1", "no case FOO-1 (case numbers here read CASE-N)"),
]


@pytest.mark.parametrize("line,reason", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_refused_command_is_answered_to_the_agent_and_the_rest_still_applies(app, line, reason):
    label = open_case(app)
    agent_writes(app, label, f"#priority high\n{line}\n#tag checked\n確認しております。\n")
    c = case(app, label)
    assert c["priority"] == "high" and "checked" in c["tags"]  # the rest still applies
    reply = sent(app, "agent_reply")
    assert len(reply) == 1 and line not in reply[0].text and "確認しております。" in reply[0].text
    notice = sent(app, "agent_notice")
    assert [i.recipient for i in notice] == ["hanako@example.com"]
    assert line in notice[0].text and reason in notice[0].text
    assert "コマンドを実行できませんでした" in notice[0].subject  # in the agent's language
    refused = events(app, label, "commands_refused")
    assert refused and refused[0]["refused"][0]["line"] == line


def test_an_english_agent_gets_the_refusal_in_english(app):
    label = open_case(app)
    agent_writes(app, label, "#asign me\nLooking into it.\n", sender="Ken Sato <ken@example.com>")
    notice = sent(app, "agent_notice", "ken@example.com")
    assert "Commands not applied" in notice[0].subject and "did you mean #assign?" in notice[0].text


def test_a_mail_of_commands_only_changes_the_case_and_mails_nobody(app):
    label = open_case(app)
    before = len(outbox_items(app))
    agent_writes(app, label, "#assign me\n#priority high\n")
    c = case(app, label)
    # new → open: an agent acted (DESIGN 5 "Lifecycle")
    assert (c["assignee"], c["priority"], c["status"]) == ("hanako@example.com", "high", "open")
    assert [(e["from"], e["to"], e["actor"]) for e in c["timeline"] if e["type"] == "status"] == \
        [("new", "open", "hanako@example.com")]
    assert len(outbox_items(app)) == before


@pytest.mark.parametrize("signature", [
    "山田 花子\n株式会社エグザンプル サポート部\nTEL 03-1234-5678\n",
    "━━━━━━━━━━━━━━━━\n山田 花子\nhanako@example.com\n━━━━━━━━━━━━━━━━\n",
])
def test_commands_and_a_signature_send_the_customer_nothing(app, signature):
    label = open_case(app)
    before = len(outbox_items(app))
    agent_writes(app, label, f"#priority high\n\n{signature}")
    assert case(app, label)["priority"] == "high" and case(app, label)["first_response_at"] is None
    assert len(outbox_items(app)) == before


def test_a_file_with_no_text_still_goes_to_the_customer(app):
    label = open_case(app)
    agent_writes(app, label, "山田 花子\n", files=[("手順書.pdf", b"%PDF-1.4", "application/pdf")])
    reply = sent(app, "agent_reply")
    assert len(reply) == 1 and [f.filename for f in reply[0].files] == ["手順書.pdf"]


def test_a_bare_note_with_commands_mails_nobody(app):
    label = open_case(app)
    before = len(outbox_items(app))
    agent_writes(app, label, "#note\n#assign me\n")
    assert case(app, label)["assignee"] == "hanako@example.com"
    assert len(outbox_items(app)) == before  # no empty note to the colleagues


def test_a_line_that_only_looks_like_a_command_is_text(app):
    label = open_case(app)
    agent_writes(app, label, "#1 まず電源を切ってください。\n#2 次にケーブルを抜いてください。\n")
    assert "#1 まず電源を切ってください。" in sent(app, "agent_reply")[0].text
    assert not sent(app, "agent_notice")


# -- internal notes ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["#note", "#internal", "＃メモ", "note-address"])
def test_an_internal_note_goes_to_the_other_agents_only(app, how):
    label = open_case(app, cc="Hanako B <hanako.b@bigcorp.co.jp>")
    note_address = reply_address("support@example.com", 1, app.processor.secret, "n")
    before = len(outbox_items(app))
    if how == "note-address":
        agent_writes(app, label, "VIP のお客様です。\n", to=note_address)
    else:
        agent_writes(app, label, f"{how}\nVIP のお客様です。\n")
    new = outbox_items(app)[before:]
    assert [(i.template, i.recipient, i.audience) for i in new] == [("internal_note", "ken@example.com", "agent")]
    assert "VIP のお客様です。" in new[0].text and "#" not in new[0].text.split("VIP")[0].splitlines()[-1]
    note = [e for e in case(app, label)["timeline"] if e["type"] == "message" and e["direction"] == "in"
            and e["visibility"] == "internal"]
    assert len(note) == 1 and note[0]["text"].strip() == "VIP のお客様です。"
    c = case(app, label)
    assert c["status"] == "open" and c["first_response_at"] is None  # an agent acted, but a note is no answer


@pytest.mark.parametrize("body", [
    "山田様\n\n#note この方は支払いが遅れています。値引きはしないでください。\n",
    "\u200b#note\nこの方は支払いが遅れています。値引きはしないでください。\n",
    "Internal:\n#internal\nこの方は支払いが遅れています。値引きはしないでください。\n",
], ids=["after-the-greeting", "zero-width-space", "english-first-line"])
def test_a_note_marker_anywhere_keeps_the_mail_from_the_customer(app, body):
    label = open_case(app)
    agent_writes(app, label, body)
    assert not sent(app, "agent_reply")
    notes = sent(app, "internal_note")
    assert [i.recipient for i in notes] == ["ken@example.com"] and "値引きはしないでください。" in notes[0].text


def test_a_known_command_below_the_text_is_applied_and_not_sent(app):
    label = open_case(app)
    agent_writes(app, label, "お世話になっております。ドライバーを更新しました。\n#status resolved\n#resolution ドライバー更新\n")
    c = case(app, label)
    assert (c["status"], c["resolution"]) == ("resolved", "ドライバー更新")
    reply = sent(app, "agent_reply")
    assert len(reply) == 1 and "#status" not in reply[0].text and "ドライバーを更新しました。" in reply[0].text
    told = sent(app, "status_changed")
    assert len(told) == 1 and "ドライバー更新" in told[0].text


def test_full_width_command_names_and_values_are_read(app):
    label = open_case(app)
    agent_writes(app, label, "＃ｐｒｉｏｒｉｔｙ　ｈｉｇｈ\n＃タグ vip\n＃タグ削除 vip\n確認します。\n")
    c = case(app, label)
    assert (c["priority"], c["tags"]) == ("high", [])
    assert not sent(app, "agent_notice")


def test_a_reply_to_an_internal_notification_stays_internal(app):
    label = open_case(app)
    agent_writes(app, label, "#note\n請求の件で確認が必要です。\n")
    note = sent(app, "internal_note")[0]
    note_address = note_reply_to(app, note)
    assert note_address == reply_address("support@example.com", 1, app.processor.secret, "n")
    # Ken answers the note from his mail client: In-Reply-To the note, to its Reply-To.
    ingest(app, make_mail(subject=f"Re: {note.subject}", sender="Ken Sato <ken@example.com>", to=note_address,
                          body="I will call them.\n", headers={**agent_auth(), "In-Reply-To": f"<{note.message_id}>"}),
           envelope_to=[note_address])
    assert not sent(app, "agent_reply")
    assert [i.recipient for i in sent(app, "internal_note")] == ["ken@example.com", "hanako@example.com"]


def test_an_outsider_answering_a_forwarded_note_joins_nobody_and_stays_internal(app):
    label = open_case(app)
    agent_writes(app, label, "#note\n支払いが遅れている方です。値引き不可。\n")
    note = sent(app, "internal_note")[0]
    note_address = note_reply_to(app, note)
    # The note was forwarded out of the team; a stranger answers it.
    ingest(app, make_mail(subject=f"Re: {note.subject}", sender="Mallory <mallory@evil.example>", to=note_address,
                          body="Please send the invoice to me instead.\n",
                          headers={"In-Reply-To": f"<{note.message_id}>"}), envelope_to=[note_address])
    c = case(app, label)
    assert "mallory@evil.example" not in c["participants"]
    came = [e for e in c["timeline"] if e["type"] == "message" and e.get("from") == "mallory@evil.example"]
    assert len(came) == 1 and came[0]["visibility"] == "internal"
    agent_writes(app, label, "ご連絡ありがとうございます。\n")
    (reply,) = sent(app, "agent_reply")
    assert reply.recipients == ["taro@bigcorp.co.jp"]


def note_reply_to(app, item) -> str:
    return str(mime(app, item)["Reply-To"].addresses[0].addr_spec)


# -- statuses ---------------------------------------------------------------------------------

def test_a_public_reply_waits_on_the_customer_and_the_customers_answer_opens_it_again(app):
    label = open_case(app)
    agent_writes(app, label, "型番を教えてください。\n")
    c = case(app, label)
    assert c["status"] == "pending" and c["first_response_at"] is not None
    ingest(app, make_mail(subject=f"Re: [{label}] プリンターが動きません", sender=CUSTOMER, body="LBP-1234 です。\n"))
    assert case(app, label)["status"] == "open"
    told = sent(app, "customer_reply_agent")
    assert {i.recipient for i in told} == {"hanako@example.com", "ken@example.com"}


def test_a_queue_may_keep_working_after_a_reply_and_a_status_command_wins(app):
    billing = open_case(app, mailbox="billing@example.com", subject="請求書")
    agent_writes(app, billing, "確認します。\n", to="billing@example.com")
    assert case(app, billing)["status"] == "open"  # billing: reply_status open
    support = open_case(app, subject="別件")
    agent_writes(app, support, "#status open\n調査します。\n")
    assert case(app, support)["status"] == "open"  # the command said so


def test_resolving_tells_the_customer_with_the_resolution_and_closing_stamps_its_time(app):
    label = open_case(app)
    agent_writes(app, label, "#resolution ドライバー 2.1 で解決\n#status resolved\n更新で直りました。\n")
    c = case(app, label)
    assert c["status"] == "resolved" and c["resolved_at"] and not c["closed_at"]
    told = sent(app, "status_changed")
    assert [i.recipient for i in told] == ["taro@bigcorp.co.jp"] and "ドライバー 2.1 で解決" in told[0].text
    agent_writes(app, label, "#status closed\n")
    assert case(app, label)["closed_at"]


def test_a_queue_may_resolve_without_telling_the_customer(app):
    label = open_case(app, mailbox="billing@example.com", subject="請求書")
    agent_writes(app, label, "#status resolved\n", to="billing@example.com")
    assert case(app, label)["status"] == "resolved" and not sent(app, "status_changed")


def test_a_reply_to_a_recently_closed_case_reopens_it_and_a_late_one_opens_a_linked_follow_up(app):
    label = open_case(app)
    with case_ops(app, utcnow() - timedelta(days=1)) as ops:
        ops.set_status(ops.tx.cases.by_number(1), "closed", actor="hanako@example.com")
    ingest(app, make_mail(subject=f"Re: [{label}] プリンター", sender=CUSTOMER, body="また止まりました。\n"))
    assert case(app, label)["status"] == "open" and len(list_cases(app)) == 1
    with case_ops(app, utcnow() - timedelta(days=4)) as ops:  # support: reopen_days 3
        ops.set_status(ops.tx.cases.by_number(1), "closed", actor="hanako@example.com")
    follow = ingest(app, make_mail(subject=f"Re: [{label}] プリンター", sender=CUSTOMER,
                                   body="再発しました。\n\n2026年11月20日(金) 10:00 サポート <support@example.com>:\n"
                                        "> 解決しましたのでクローズします。\n"))
    assert follow.case_number == "CASE-2" and case(app, label)["status"] == "closed"
    # The follow-up is named and shown by what is new: no old token, no quoted history.
    new = case(app, "CASE-2")
    assert new["subject"] == "プリンター"
    first = next(e for e in new["timeline"] if e["type"] == "message")
    assert first["text"].strip() == "再発しました。"
    notice = [i for i in sent(app, "new_case_agent") if i.case == "CASE-2"]
    assert notice and "再発しました。" in notice[0].text and "解決しましたので" not in notice[0].text
    assert "[CASE-2]" in sent(app, "ack")[-1].subject and label not in sent(app, "ack")[-1].subject
    assert [(link["case"], link["kind"]) for link in case(app, "CASE-2")["links"]] == [(label, "follow-up")]
    assert [(link["case"], link["kind"]) for link in case(app, label)["links"]] == [("CASE-2", "follow-up")]


def test_a_queue_that_opens_a_new_case_for_any_reply_to_a_closed_one(app):
    label = open_case(app)
    agent_writes(app, label, "#queue sales\n#status closed\n")
    out = ingest(app, make_mail(subject=f"Re: [{label}] プリンター", sender=CUSTOMER, body="もう一点。\n"))
    assert out.case_number == "CASE-2"
    assert any("its queue opens a new case" in (e.get("text") or "") for e in events(app, "CASE-2", "note"))


# -- merge and link ---------------------------------------------------------------------------

def test_merge_moves_the_duplicate_and_its_threads_land_on_the_case_that_carries_on(app):
    first = open_case(app, subject="印刷できない", message_id="<a1@bigcorp.co.jp>")
    dup = open_case(app, subject="印刷できない（再送）", sender="Hanako B <hanako.b@bigcorp.co.jp>",
                    message_id="<b1@bigcorp.co.jp>")
    agent_writes(app, dup, f"#merge {first}\n")
    d, f = case(app, dup), case(app, first)
    assert d["status"] == "closed" and d["merged_into"] == first
    assert "hanako.b@bigcorp.co.jp" in f["participants"]
    assert any(e.get("message_id") == "b1@bigcorp.co.jp" for e in f["timeline"] if e["type"] == "message")
    # Later mail to the duplicate's threads: by References, by its token, by its signed address.
    ingest(app, make_mail(subject="Re: 印刷", sender="Hanako B <hanako.b@bigcorp.co.jp>", body="one\n",
                          headers={"In-Reply-To": "<b1@bigcorp.co.jp>"}))
    ingest(app, make_mail(subject=f"Re: [{dup}] 印刷", sender="Hanako B <hanako.b@bigcorp.co.jp>", body="two\n"))
    signed = reply_address("support@example.com", 2, app.processor.secret, "c")
    ingest(app, make_mail(subject="Re: 印刷", sender="Hanako B <hanako.b@bigcorp.co.jp>", to=signed, body="three\n"),
           envelope_to=[signed])
    texts = [e["text"].strip() for e in case(app, first)["timeline"] if e["type"] == "message"]
    assert {"one", "two", "three"} <= set(texts)
    assert len(list_cases(app)) == 2


def test_merge_refuses_itself_and_a_merged_case(app):
    a, b = open_case(app, subject="A"), open_case(app, subject="B")
    agent_writes(app, a, f"#merge {a}\n")
    assert "cannot be merged into itself" in sent(app, "agent_notice")[0].text
    agent_writes(app, b, f"#merge {a}\n")
    agent_writes(app, b, f"#merge {a}\n")  # lands on A, which cannot be merged into itself either
    assert case(app, b)["merged_into"] == a
    refusals = sent(app, "agent_notice", "hanako@example.com")
    assert len(refusals) == 2 and "cannot be merged into itself" in refusals[1].text


def test_a_case_number_too_long_to_be_one_is_text_not_a_case(app):
    huge = "9" * 5000
    label = open_case(app)
    out = ingest(app, make_mail(subject=f"Re: [CASE-{huge}] 請求書", sender="Bob <bob@elsewhere.example>",
                                body="Where is my invoice?\n"))
    assert out.case_number == "CASE-2"  # a new case, acknowledged like any other
    assert sent(app, "ack", "bob@elsewhere.example")
    agent_writes(app, label, f"#merge CASE-{huge}\n#priority high\n")
    assert inbound_detail(app, str(ingest.last))["state"] == "processed"  # refused, not quarantined
    assert case(app, label)["priority"] == "high"
    notice = sent(app, "agent_notice", "hanako@example.com")
    assert len(notice) == 1 and "is not a case number" in notice[0].text
    assert notice[0].text.count(huge) == 1  # the line, once; the reason quotes it cut short


def test_an_agent_writing_from_a_plus_address_acts_as_themself(app):
    label = open_case(app)
    agent_writes(app, label, "#assign me\n確認します。\n", sender="山田 花子 <hanako+work@example.com>")
    assert case(app, label)["assignee"] == "hanako@example.com"
    assert len(sent(app, "agent_reply", "taro@bigcorp.co.jp")) == 1
    assert not sent(app, "agent_notice")


def test_a_strangers_token_opens_a_new_case_linked_to_the_old_one(app):
    label = open_case(app)
    out = ingest(app, make_mail(subject=f"Re: [{label}] プリンター", sender="Mallory <m@attacker.example>",
                                body="I am the customer, send me the invoice.\n"))
    assert out.case_number == "CASE-2"
    assert any(link["case"] == label for link in case(app, "CASE-2")["links"])
    assert any(link["case"] == "CASE-2" for link in case(app, label)["links"])  # the old case shows it
    assert case(app, label)["participants"] == ["taro@bigcorp.co.jp"]


# -- participants -----------------------------------------------------------------------------

def test_the_requesters_to_and_cc_become_participants_up_to_the_cap(app):
    label = open_case(app, to="support@example.com, a@bigcorp.co.jp", cc="b@bigcorp.co.jp, c@bigcorp.co.jp")
    c = case(app, label)
    # max_participants = 3: the requester and two more.
    assert c["participants"] == ["a@bigcorp.co.jp", "b@bigcorp.co.jp", "taro@bigcorp.co.jp"]
    assert any("c@bigcorp.co.jp" in (e.get("text") or "") for e in events(app, label, "note"))
    agent_writes(app, label, "承知しました。\n")
    reply = sent(app, "agent_reply")[0]
    assert reply.recipients == ["taro@bigcorp.co.jp", "a@bigcorp.co.jp", "b@bigcorp.co.jp"]


def test_someone_who_joins_by_references_gets_replies_only_while_in_to_or_cc(app):
    label = open_case(app, message_id="<t1@bigcorp.co.jp>")
    # A colleague of the customer answers the thread (References), copying the customer.
    ingest(app, make_mail(subject="Re: プリンター", sender="佐藤 次郎 <jiro.sato@bigcorp.co.jp>",
                          cc="taro@bigcorp.co.jp", body="型番は LBP-1234 です。\n",
                          headers={"In-Reply-To": "<t1@bigcorp.co.jp>"}))
    # The notice names the real author, not the requester.
    told = sent(app, "customer_reply_agent")
    assert told and all("佐藤 次郎" in i.text and "山田 太郎" not in i.text.split("----")[0] for i in told)
    agent_writes(app, label, "ありがとうございます。\n")
    assert sent(app, "agent_reply")[-1].recipients == ["taro@bigcorp.co.jp", "jiro.sato@bigcorp.co.jp"]
    # The customer writes again without the colleague: the next reply leaves the colleague out.
    ingest(app, make_mail(subject=f"Re: [{label}] プリンター", sender=CUSTOMER, body="まだ直りません。\n"))
    agent_writes(app, label, "確認します。\n")
    assert sent(app, "agent_reply")[-1].recipients == ["taro@bigcorp.co.jp"]


# -- files ------------------------------------------------------------------------------------

def test_an_agents_files_go_to_the_customer_with_the_reply(app):
    label = open_case(app)
    manual = "手順書.pdf"
    agent_writes(app, label, "手順書をお送りします。\n", files=[(manual, b"%PDF-1.4 manual", "application/pdf")])
    reply = sent(app, "agent_reply")[0]
    assert [f.filename for f in reply.files] == [manual]
    m = mime(app, reply)
    parts = [p for p in m.iter_attachments()]
    assert [p.get_filename() for p in parts] == [manual] and parts[0].get_content() == b"%PDF-1.4 manual"
    assert "手順書をお送りします。" in m.get_body(("plain",)).get_content()


def test_the_agent_notice_attaches_the_customers_files_within_the_budget_and_lists_the_rest(app):
    ingest(app, mail_with_files(subject="エラー画面", sender=CUSTOMER, to="support@example.com", body="画面です。\n",
                                files=[("small.png", b"\x89PNG" + b"x" * 500, "image/png"),
                                       ("big.log", b"y" * 2000, "text/plain")]))
    notice = sent(app, "new_case_agent")[0]
    assert [f.filename for f in notice.files] == ["small.png"]  # attach_max = 1KB
    assert "small.png" in notice.text and "big.log" in notice.text
    assert "intake attachments" in notice.text.split("big.log")[1].splitlines()[0]


def test_attachments_list_and_get_give_the_files_back_exactly(app, run_intake, tmp_path):
    data = bytes(range(256)) * 4
    ingest(app, mail_with_files(subject="ログ", sender=CUSTOMER, to="support@example.com", body="ログです。\n",
                                files=[("ログ.bin", data, "application/octet-stream")]))
    files = json.loads(run_intake("attachments", "list", "CASE-1", "--json", check=True).stdout)
    assert [(f["filename"], f["size"], f["direction"]) for f in files] == [("ログ.bin", 1024, "in")]
    out = tmp_path / "got.bin"
    run_intake("attachments", "get", str(files[0]["id"]), "-o", str(out), check=True)
    assert out.read_bytes() == data
    assert "ログ.bin" in run_intake("attachments", "list", "CASE-1", check=True).stdout
    missing = run_intake("attachments", "get", "999")
    assert missing.returncode == 1 and "no attachment #999" in missing.stderr


# -- the text kept ----------------------------------------------------------------------------

def test_the_timeline_and_notices_show_the_new_text_without_the_quoted_history(app):
    label = open_case(app, message_id="<q1@bigcorp.co.jp>")
    agent_writes(app, label, "型番を教えてください。\n")
    body = ("LBP-1234 です。\n\n2026年11月20日(金) 10:30 山田 花子 <hanako@example.com>:\n"
            "> 型番を教えてください。\n")
    ingest(app, make_mail(subject=f"Re: [{label}] プリンター", sender=CUSTOMER, body=body))
    last = [e for e in case(app, label)["timeline"] if e["type"] == "message" and e["direction"] == "in"][-1]
    assert last["text"].strip() == "LBP-1234 です。"
    told = sent(app, "customer_reply_agent")[-1]
    assert "LBP-1234 です。" in told.text and "> 型番" not in told.text


# -- the command line -------------------------------------------------------------------------

def test_cases_update_changes_every_field_as_the_actor(app, run_intake):
    open_case(app)
    out = run_intake("cases", "update", "CASE-1", "--priority", "high", "--assign", "ken@example.com",
                     "--queue", "billing", "--category", "hardware", "--tag", "vip", "--resolution", "再起動で解決",
                     "--status", "resolved", "--as", "ken@example.com", check=True).stdout
    assert "CASE-1:" in out and "status resolved" in out
    c = case(app, "CASE-1")
    assert (c["priority"], c["assignee"], c["queue"], c["category"], c["tags"], c["resolution"], c["status"]) == \
        ("high", "ken@example.com", "billing", "hardware", ["vip"], "再起動で解決", "resolved")
    by = {e["type"]: e["actor"] for e in c["timeline"] if e["type"] in ("priority", "queue", "status", "tags")}
    assert set(by.values()) == {"ken@example.com"}
    # billing resolves without telling the customer
    assert not sent(app, "status_changed")
    run_intake("cases", "update", "CASE-1", "--untag", "vip", check=True)
    assert case(app, "CASE-1")["tags"] == []
    bad = run_intake("cases", "update", "CASE-1", "--queue", "nosuch")
    assert bad.returncode == 1 and "no queue 'nosuch'" in bad.stderr
    bad = run_intake("cases", "update", "CASE-1", "--status", "done")
    assert bad.returncode == 64 and "'done' is not one of" in bad.stderr
    assert run_intake("cases", "update", "CASE-9", "--priority", "low").returncode == 1


def test_no_change_to_a_case_while_the_rules_are_refused(app, run_intake, tmp_path):
    # The agents and queues come from the rules: without them an assignee would be checked
    # against nobody. Reading goes on.
    open_case(app)
    (tmp_path / "routing_rules" / "20-broken.yaml").write_text("rules:\n  - name: x\n    when: {subjct: a}\n",
                                                              "utf-8")
    bad = run_intake("cases", "update", "CASE-1", "--assign", "nobody@nowhere.example", "--as", "ken@example.com")
    assert bad.returncode == 1
    assert "a change to a case needs their agents and queues" in bad.stderr and "20-broken.yaml:2" in bad.stderr
    assert case(app, "CASE-1")["assignee"] is None
    assert run_intake("cases", "note", "CASE-1", "--as", "hanako@example.com", "-m", "メモ").returncode == 1
    assert run_intake("cases", "show", "CASE-1").returncode == 0


def test_an_assignee_must_be_an_agent_of_the_rules(app, run_intake):
    open_case(app)
    bad = run_intake("cases", "update", "CASE-1", "--assign", "nobody@nowhere.example")
    assert bad.returncode == 1 and "nobody@nowhere.example is not an agent" in bad.stderr
    assert case(app, "CASE-1")["assignee"] is None


def test_cases_note_and_reply_from_the_command_line(app, run_intake, tmp_path):
    open_case(app)
    run_intake("cases", "note", "CASE-1", "--as", "hanako@example.com", "-m", "電話で確認済み", check=True)
    assert [i.recipient for i in sent(app, "internal_note")] == ["ken@example.com"]
    f = tmp_path / "回答.txt"
    f.write_text("手順書を添付します。\n", "utf-8")
    pdf = tmp_path / "手順書.pdf"
    pdf.write_bytes(b"%PDF-1.4")
    out = run_intake("cases", "reply", "CASE-1", "--as", "hanako@example.com", "--file", str(f),
                     "--attach", str(pdf), check=True).stdout
    assert "reply queued to taro@bigcorp.co.jp with 1 file(s); status pending" in out
    reply = sent(app, "agent_reply")[0]
    assert "手順書を添付します。" in reply.text and [x.filename for x in reply.files] == ["手順書.pdf"]
    refused = run_intake("cases", "reply", "CASE-1", "--as", "mallory@attacker.example", "-m", "hi")
    assert refused.returncode == 64 and "not an agent" in refused.stderr
    assert run_intake("cases", "note", "CASE-1", "--as", "hanako@example.com").returncode == 64


def test_cases_merge_and_link_from_the_command_line(app, run_intake):
    for subject in ("A", "B", "C"):
        open_case(app, subject=subject)
    assert "CASE-2 merged into CASE-1" in run_intake("cases", "merge", "CASE-2", "--into", "CASE-1", check=True).stdout
    assert case(app, "CASE-2")["merged_into"] == "CASE-1"
    again = run_intake("cases", "merge", "CASE-2", "--into", "CASE-3")
    assert again.returncode == 1 and "already merged" in again.stderr
    assert "linked" in run_intake("cases", "link", "CASE-1", "CASE-3", "--as", "ken@example.com", check=True).stdout
    assert "were linked already" in run_intake("cases", "link", "CASE-3", "CASE-1", check=True).stdout
    assert any(link["case"] == "CASE-3" for link in case(app, "CASE-1")["links"])
    shown = run_intake("cases", "show", "CASE-3", check=True).stdout
    assert "linked with CASE-1 by ken@example.com" in shown


def test_cases_show_reads_as_sentences_and_names_the_recipients(app, run_intake):
    open_case(app)
    agent_writes(app, "CASE-1", "#priority high\n確認します。\n")
    shown = run_intake("cases", "show", "CASE-1", check=True).stdout
    assert "status new → pending by hanako@example.com" in shown
    assert "priority medium → high by hanako@example.com" in shown
    assert "mail → taro@bigcorp.co.jp [agent_reply]" in shown
    assert "{" not in shown  # no raw JSON


def test_cases_list_filters(app, run_intake):
    open_case(app, subject="プリンター")
    open_case(app, subject="請求書", mailbox="billing@example.com", sender="Erin <erin@client.example.net>")
    agent_writes(app, "CASE-1", "#assign me\n#category hardware\n")

    def listed(*args: str) -> list[str]:
        return [c["number"] for c in json.loads(run_intake("cases", "list", "--json", *args, check=True).stdout)]

    assert listed("--assignee", "hanako@example.com") == ["CASE-1"]
    assert listed("--assignee", "none") == ["CASE-2"]
    assert listed("--requester", "erin@client.example.net") == ["CASE-2"]
    assert listed("--organization", "bigcorp.co.jp") == ["CASE-1"]
    assert listed("--category", "hardware") == ["CASE-1"]
    assert listed("--queue", "billing") == ["CASE-2"]
    assert listed("--search", "請求") == ["CASE-2"]
    assert listed("--channel", "email") == ["CASE-1", "CASE-2"]
    bad = run_intake("cases", "list", "--status", "bogus")
    assert bad.returncode == 64 and "'bogus' is not one of" in bad.stderr


def test_every_status_change_stamps_its_time_once(app):
    label = open_case(app)
    agent_writes(app, label, "#status resolved\n")
    resolved_at = case_record(app, 1).resolved_at
    agent_writes(app, label, "#status resolved\n")
    assert case_record(app, 1).resolved_at == resolved_at
    assert len(events(app, label, "status")) == 1


def test_a_reopened_case_is_no_longer_resolved_or_closed(app):
    label = open_case(app)
    agent_writes(app, label, "#status resolved\n#status closed\n")
    assert case_record(app, 1).resolved_at is not None and case_record(app, 1).closed_at is not None
    ingest(app, make_mail(subject=f"Re: [{label}] プリンター", sender=CUSTOMER, body="また止まりました。\n"))
    rec = case_record(app, 1)
    assert (rec.status, rec.resolved_at, rec.closed_at) == ("open", None, None)
    agent_writes(app, label, "#status resolved\n")
    assert case_record(app, 1).resolved_at is not None  # stamped again when resolved again


def test_a_japanese_reply_carries_the_agents_own_salutation_only(app):
    label = open_case(app)
    agent_writes(app, label, "山田 太郎 様\n\nお世話になっております。サポートの山田です。\nドライバーを更新してください。\n")
    text = sent(app, "agent_reply")[0].text
    assert text.lstrip().startswith("山田 太郎 様") and text.count("様") == 1
    assert "お世話になっております。" in text and "受付番号：CASE-1" in text
