"""Parsing measured against the expectations of four public mail-parsing test suites.

The raw mails and ``manifest.json`` files in ``tests/corpus/`` are copied byte for byte
from the projects named in ``tests/corpus/README.md`` (licences beside them). Each
expectation is that project's behaviour; where we judge one wrong we say so, with the
reason, in ``JUDGED_WRONG`` below, and that one expectation is not scored. Everything else
must hold: at least 97 % of all cases meet every expectation, every Japanese case meets
every expectation, and no raw mail makes the parser raise.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from intake.parse import Attachment, ParsedMail, html_to_text, parse

CORPUS = Path(__file__).resolve().parent / "corpus"
CORPORA = ("stalwart_mail_parser", "mikel_mail", "jpmobile", "django_helpdesk")

# Expectations we judge wrong: (case id, expectation key) → why. These keys are left out of
# the score for that case only; every other expectation of the case is still checked.
JUDGED_WRONG: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Case:
    corpus: str
    id: str
    raw: Path
    tags: tuple[str, ...]
    expected: dict

    @property
    def japanese(self) -> bool:
        return "japanese" in self.tags


def _load_cases() -> list[Case]:
    cases = []
    for corpus in CORPORA:
        manifest = json.loads((CORPUS / corpus / "manifest.json").read_text("utf-8"))
        for c in manifest["cases"]:
            cases.append(Case(corpus, c["id"], CORPUS / corpus / c["raw_path"], tuple(c["tags"]), c["expected"]))
    return cases


CASES = _load_cases()
# Informational keys of the manifests (see the corpus README): never scored.
_INFORMATIONAL = {"jmap_attachment_count", "jpmobile_specific"}


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _exact_form(text: str) -> str:
    # The manifests compare after CRLF→LF and a strip of trailing white space.
    return text.replace("\r\n", "\n").rstrip()


def _md5(payload: bytes) -> str:
    return hashlib.md5(payload).hexdigest()  # noqa: S324 - the manifests give MD5 sums


# Per expected attachment, the fields compared when the manifest gives them ("inline" and
# "message_rfc822" are JMAP's view and informational).
_ATTACHMENT_FIELDS = ("filename", "mime_type", "size", "md5")


def _describe(a: Attachment) -> dict[str, object]:
    return {"filename": a.filename, "mime_type": a.content_type, "size": a.size, "md5": _md5(a.payload)}


def _attachments_match(want: list[dict], mail: ParsedMail) -> bool:
    """Same number of attachments, and each expected one matched by a distinct one of ours."""
    got = [_describe(a) for a in mail.attachments]
    if len(got) != len(want):
        return False
    for w in want:
        keys = [k for k in _ATTACHMENT_FIELDS if k in w]
        hit = next((g for g in got if all(g[k] == w[k] for k in keys)), None)
        if hit is None:
            return False
        got.remove(hit)
    return True


def failures(case: Case, mail: ParsedMail) -> list[str]:
    """Each expectation of ``case`` that ``mail`` does not meet, as a readable line."""
    out: list[str] = []
    exp = case.expected

    def check(key: str, ok: bool, got: object) -> None:
        if (case.id, key) in JUDGED_WRONG:
            return
        if not ok:
            out.append(f"{key}: expected {exp[key]!r}, got {got!r}")

    for key in exp:
        if key in _INFORMATIONAL:
            continue
        want = exp[key]
        if key == "subject":
            check(key, mail.subject == want, mail.subject)
        elif key == "from_address":
            got = mail.from_.address if mail.from_ else None
            check(key, got == want, got)
        elif key == "from_name":
            got = mail.from_.name if mail.from_ else mail.from_display
            check(key, got == want, got)
        elif key == "to_addresses":
            got = [a.address for a in mail.to]
            check(key, got == want, got)
        elif key == "body_text_exact":
            check(key, _exact_form(mail.text) == _exact_form(want), mail.text)
        elif key == "body_contains":
            hay = _collapse(mail.text) + "\n" + _collapse(html_to_text(mail.html) if mail.html else "")
            missing = [s for s in want if _collapse(s) not in hay]
            check(key, not missing, mail.text[:300])
        elif key == "body_empty":
            check(key, (mail.text.strip() == "") == want, mail.text[:300])
        elif key == "attachment_filenames":
            # The manifests list the names that exist; unnamed attachments are counted
            # under "attachments".
            got = [a.filename for a in mail.attachments if a.filename is not None]
            check(key, Counter(got) == Counter(want), got)
        elif key == "attachment_filenames_include":
            got = [a.filename for a in mail.attachments]
            check(key, not (Counter(want) - Counter(got)), got)
        elif key == "attachment_count":
            check(key, len(mail.attachments) == want, len(mail.attachments))
        elif key == "attachments":
            check(key, _attachments_match(want, mail), [_describe(a) for a in mail.attachments])
        else:
            out.append(f"{key}: unknown expectation key (update the test)")
    return out


def score() -> dict[str, tuple[int, int, list[tuple[str, list[str]]]]]:
    """Per corpus: (cases passing, cases, [(failing case id, failures)])."""
    result: dict[str, tuple[int, int, list[tuple[str, list[str]]]]] = {}
    for corpus in CORPORA:
        mine = [c for c in CASES if c.corpus == corpus]
        failing = []
        for case in mine:
            bad = failures(case, parse(case.raw.read_bytes()))
            if bad:
                failing.append((case.id, bad))
        result[corpus] = (len(mine) - len(failing), len(mine), failing)
    return result


def test_the_corpus_copy_is_complete() -> None:
    """Every case named in the manifests is here, with its corpus licence."""
    assert len(CASES) == 260
    for corpus in CORPORA:
        assert (CORPUS / corpus / "LICENSE.upstream").is_file()
    assert all(c.raw.is_file() for c in CASES)


def test_judged_wrong_list_names_real_expectations() -> None:
    """A stale entry in the list of wrong expectations would hide nothing: refuse it."""
    by_id = {c.id: c for c in CASES}
    for case_id, key in JUDGED_WRONG:
        assert key in by_id[case_id].expected, (case_id, key)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_no_raw_mail_makes_the_parser_raise(case: Case) -> None:
    """Malformed mail included: parsing returns a ParsedMail with a Message-ID."""
    mail = parse(case.raw.read_bytes())
    assert mail.message_id
    assert isinstance(mail.text, str)


def test_at_least_97_percent_of_cases_meet_all_expectations() -> None:
    result = score()
    passing = sum(p for p, _, _ in result.values())
    total = sum(t for _, t, _ in result.values())
    report = "\n".join(f"{cid}: {'; '.join(bad)}" for _, _, failing in result.values() for cid, bad in failing)
    assert passing / total >= 0.97, f"{passing}/{total} pass\n{report}"


@pytest.mark.parametrize("case", [c for c in CASES if c.japanese], ids=lambda c: c.id)
def test_every_japanese_case_meets_its_expectations(case: Case) -> None:
    assert failures(case, parse(case.raw.read_bytes())) == []
