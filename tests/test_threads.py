"""Threading decisions (DESIGN 5) and the subject clean-up, as pure functions."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from intake.mail.parse import parse
from intake.mail.subjects import clean_subject, subject_with_token
from intake.threads import (
    Evidence,
    TokenCase,
    case_tokens,
    decide,
    gather,
    parse_reply_address,
    reply_address,
)
from mailfactory import make_mail

MEMBER = TokenCase(frozenset({"alice@customer.example.org"}), "customer.example.org")


@pytest.mark.parametrize(
    "subject,expected",
    [
        ("Re: Invoice", "Invoice"),
        ("RE: FW: Invoice", "Invoice"),
        ("Fwd: AW: WG: SV: VS: Invoice", "Invoice"),
        ("Re[2]: Invoice", "Invoice"),
        ("Re^3: Invoice", "Invoice"),
        ("返信: 請求書について", "請求書について"),
        ("転送：Re: 請求書について", "請求書について"),
        ("Antw: Factuur", "Factuur"),
        ("[Fwd: report]", "[Fwd: report]".replace("[Fwd: ", "[Fwd: ")),
        ("Regarding the invoice", "Regarding the invoice"),
        ("Re:", ""),
    ],
)
def test_clean_subject(subject, expected):
    assert clean_subject(subject) == expected


def test_case_tokens_any_configured_prefix():
    assert case_tokens("Re: [CASE-1042] printer", {"CASE"}) == [("CASE", 1042)]
    assert case_tokens("[acme-7] x [CASE-9]", {"CASE", "ACME"}) == [("ACME", 7), ("CASE", 9)]
    assert case_tokens("CASE-1042 without brackets", {"CASE"}) == []


def test_signed_reply_address_round_trip_and_forgery():
    addr = reply_address("support@example.com", 1042, "s3cret")
    assert addr.startswith("support+c1042-") and addr.endswith("@example.com")
    assert parse_reply_address(addr, "s3cret") == ("c", 1042)
    assert parse_reply_address(addr.replace("c1042", "c1043"), "s3cret") is None
    assert parse_reply_address(addr, "other-secret") is None
    note = reply_address("support@example.com", 1042, "s3cret", kind="n")
    assert parse_reply_address(note, "s3cret") == ("n", 1042)


def test_decide_order():
    alice = {"sender": "alice@customer.example.org", "sender_domain": "customer.example.org"}
    assert decide(Evidence(signed=("c", 5), signed_case_exists=True, by_message_id=6)).case_number == 5
    assert decide(Evidence(by_message_id=6, by_message_id_ref="x@y", tokens=(7,), token_cases={7: MEMBER},
                           **alice)).method == "references"
    assert decide(Evidence(tokens=(7,), token_cases={7: MEMBER}, **alice)).case_number == 7


@pytest.mark.parametrize("sender,domain,agent,joins", [
    ("alice@customer.example.org", "customer.example.org", False, True),  # a participant
    ("bob@customer.example.org", "customer.example.org", False, True),  # the same organization
    ("hanako@example.com", "example.com", True, True),  # an agent
    ("mallory@evil.example.net", "evil.example.net", False, False),  # a stranger
])
def test_a_subject_token_counts_only_for_someone_who_belongs_to_the_case(sender, domain, agent, joins):
    m = decide(Evidence(sender=sender, sender_domain=domain, sender_is_agent=agent, tokens=(7,),
                        token_cases={7: MEMBER}))
    assert (m.case_number == 7) is joins
    assert m.mentions == (() if joins else (7,))


def test_token_of_a_case_that_does_not_exist_is_no_evidence():
    m = decide(Evidence(sender="alice@customer.example.org", tokens=(99,), token_cases={}))
    assert m.case_number is None and m.mentions == () and m.reason == "no reference to a known case"


@dataclass
class _Case:
    id: int
    number: int
    organization: str | None


class _Lookup:
    """What the store knows, as plain data: cases by number, Message-IDs, participants."""

    def __init__(self) -> None:
        self.cases = {7: _Case(70, 7, "customer.example.org"), 8: _Case(80, 8, None)}
        self.ids = {"ack-7@example.com": 7}
        self.members = {70: {"alice@customer.example.org"}, 80: {"carol@other.example"}}

    def by_number(self, number: int) -> _Case | None:
        return self.cases.get(number)

    def by_message_ids(self, ids):
        for mid in ids:
            if mid in self.ids:
                return self.cases[self.ids[mid]], mid
        return None

    def by_thread_index(self, prefix: str) -> None:
        return None

    def participant_addresses(self, case_id: int) -> set[str]:
        return self.members[case_id]


def test_gather_finds_the_signed_address_references_and_tokens():
    secret = "s3cret"
    signed = reply_address("support@example.com", 8, secret)
    mail = parse(make_mail(subject="Re: [CASE-7] printer", sender="bob@customer.example.org",
                           headers={"In-Reply-To": "<ack-7@example.com>"}))
    ev = gather(_Lookup(), mail, recipients=[signed], secret=secret, prefixes={"CASE"}, sender_is_agent=False)
    assert ev.signed == ("c", 8) and ev.signed_case_exists
    assert ev.by_message_id == 7 and ev.by_message_id_ref == "ack-7@example.com"
    assert ev.token_cases[7] == TokenCase(frozenset({"alice@customer.example.org"}), "customer.example.org")
    assert decide(ev).method == "signed-address"
    # Without the signed address and the reference, the token decides: bob is of alice's organization.
    mail = parse(make_mail(subject="Re: [CASE-7] printer", sender="bob@customer.example.org"))
    ev = gather(_Lookup(), mail, recipients=["support@example.com"], secret=secret, prefixes={"CASE"},
                sender_is_agent=False)
    assert decide(ev).case_number == 7


def test_the_case_token_goes_once_after_the_reply_prefix():
    assert subject_with_token("Re: printer", "CASE-7") == "Re: [CASE-7] printer"
    assert subject_with_token("Re: [case-7] printer [CASE-7]", "CASE-7") == "Re: [CASE-7] printer"
    assert subject_with_token("返信： 請求書", "CASE-7") == "返信： [CASE-7] 請求書"


def test_token_from_a_stranger_starts_a_new_case_that_mentions_the_old_one():
    m = decide(Evidence(sender="mallory@evil.example.net", tokens=(7,), token_cases={7: MEMBER}))
    assert m.case_number is None
    assert m.mentions == (7,)


def test_note_address_makes_an_internal_comment():
    m = decide(Evidence(signed=("n", 5), signed_case_exists=True))
    assert m.case_number == 5 and m.internal
