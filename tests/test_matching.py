"""Threading decisions (DESIGN 5) and the subject clean-up, as pure functions."""

from __future__ import annotations

import pytest

from intake.threads import (
    Evidence,
    case_tokens,
    clean_subject,
    decide,
    parse_reply_address,
    reply_address,
)


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
    assert decide(Evidence(signed=("c", 5), signed_case_exists=True, by_message_id=6)).case_number == 5
    assert decide(Evidence(by_message_id=6, by_message_id_ref="x@y", tokens=(7,), token_cases={7: True})).method == "references"
    assert decide(Evidence(tokens=(7,), token_cases={7: True})).case_number == 7


def test_token_from_a_stranger_starts_a_new_case_that_mentions_the_old_one():
    m = decide(Evidence(tokens=(7,), token_cases={7: False}))
    assert m.case_number is None
    assert m.mentions == (7,)


def test_note_address_makes_an_internal_comment():
    m = decide(Evidence(signed=("n", 5), signed_case_exists=True))
    assert m.case_number == 5 and m.internal
