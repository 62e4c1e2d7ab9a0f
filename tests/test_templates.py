"""Templates: every shipped template in both languages, the sandbox, lookup and `templates check`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from intake.notify import sample_context
from intake.templates import SHIPPED, TEMPLATE_NAMES, TemplateError, TemplateSet

# Golden checks: (subject, key lines of the text part) for the sample data.
GOLDEN = {
    ("ack", "ja"): ("[CASE-1042] お問い合わせを受け付けました：プリンターが印刷できません",
                    ["山田 太郎 様", "　受付番号：CASE-1042", "通常、4時間以内に担当者よりご連絡いたします。",
                     "※本メールは受付確認のため自動で送信しております。"]),
    ("ack", "en"): ("[CASE-1042] We have received your request: Printer does not print",
                    ["Dear 山田 太郎,", "  Case number: CASE-1042", "You can expect a first response within 4 hours."]),
    # The agent writes the salutation: the template adds none (no "様" twice).
    ("agent_reply", "ja"): ("Re: [CASE-1042] プリンターが印刷できません",
                            ["ドライバーを更新してください。", "Acme サポート窓口　山田 花子"]),
    ("agent_reply", "en"): ("Re: [CASE-1042] Printer does not print",
                            ["Please update the driver.", "山田 花子, Acme Support"]),
    ("status_changed", "ja"): ("[CASE-1042] ステータス変更のお知らせ：プリンターが印刷できません",
                               ["お問い合わせ（受付番号：CASE-1042）のステータスを「対応中」から「解決済み」に変更いたしましたので、お知らせいたします。",
                                "【対応内容】", "ドライバーを更新しました。"]),
    ("status_changed", "en"): ("[CASE-1042] Status update: Printer does not print",
                               ['The status of your case CASE-1042 has changed from "open" to "resolved".',
                                "Resolution:", "We updated the driver."]),
    ("new_case_agent", "ja"): ("[CASE-1042] 新規お問い合わせ：プリンターが印刷できません",
                               ["　お客様　：山田 太郎 <taro@bigcorp.co.jp>", "　優先度　：高",
                                "　初回応答期限：2026年11月20日 14:00", "<よろしくお願いします>",
                                "社内メモは support+n1042-abcdefghij@example.com 宛てにお送りください（お客様には送信されません）。"]),
    ("new_case_agent", "en"): ("[CASE-1042] New case: Printer does not print",
                               ["  Customer:  山田 太郎 <taro@bigcorp.co.jp>", "  First response due: 2026-11-20 14:00 JST",
                                "<thanks>"]),
    ("customer_reply_agent", "ja"): ("[CASE-1042] お客様から返信がありました：プリンターが印刷できません",
                                     ["山田 太郎 様から CASE-1042 に返信がありました。", "お問い合わせは「対応中」に戻りました。",
                                      "　・エラー画面.png（47.1 KB）",
                                      "　・ログ.zip（30720.0 KB）　※大きいため添付していません（intake attachments で取得できます）"]),
    ("customer_reply_agent", "en"): ("[CASE-1042] Customer replied: Printer does not print",
                                     ["山田 太郎 replied on CASE-1042.", "The case is open again.", "  - error.png (47.1 KB)",
                                      "  - logs.zip (30720.0 KB), not attached (too large: intake attachments gets it)"]),
    ("internal_note", "ja"): ("[CASE-1042] 社内メモ：プリンターが印刷できません",
                              ["山田 花子 さんが CASE-1042 に社内メモを残しました（お客様には送信されていません）。",
                               "お客様には明日電話します。"]),
    ("internal_note", "en"): ("[CASE-1042] Internal note: Printer does not print",
                              ["山田 花子 left an internal note on CASE-1042 (not sent to the customer).",
                               "I will call the customer tomorrow."]),
    ("agent_notice", "ja"): ("[CASE-1042] コマンドを実行できませんでした：プリンターが印刷できません",
                             ["　#statsu resolved", "　　→ unknown command #statsu (did you mean #status?)"]),
    ("agent_notice", "en"): ("[CASE-1042] Commands not applied: Printer does not print",
                             ["  #statsu resolved", "    -> unknown command #statsu (did you mean #status?)"]),
    ("escalated", "ja"): ("[CASE-1042] エスカレーション（レベル1）：プリンターが印刷できません",
                          ["CASE-1042 がエスカレーションされました（レベル1）。", "理由：SLA first response breached"]),
    ("escalated", "en"): ("[CASE-1042] Escalated (level 1): Printer does not print",
                          ["CASE-1042 has been escalated to level 1.", "Reason: SLA first response breached"]),
    ("auto_close_warning", "ja"): ("[CASE-1042] 自動クローズのご案内：プリンターが印刷できません",
                                   ["このまま 2026年11月27日 10:00 までにご返信がない場合、本件は解決したものとして自動的にクローズさせていただきます。"]),
    ("auto_close_warning", "en"): ("[CASE-1042] Your case will be closed soon: Printer does not print",
                                   ["If we do not hear from you by 2026-11-27 10:00 JST, we will consider the matter"]),
    ("auto_closed", "ja"): ("[CASE-1042] お問い合わせをクローズいたしました：プリンターが印刷できません",
                            ["お問い合わせ（受付番号：CASE-1042）は、一定期間ご返信がございませんでしたので、クローズさせていただきました。"]),
    ("auto_closed", "en"): ("[CASE-1042] Your case has been closed: Printer does not print",
                            ["As we have not heard from you for a while, we have closed case CASE-1042."]),
}


def test_golden_table_covers_every_template_in_both_languages():
    assert {k for k in GOLDEN} == {(n, lang) for n in TEMPLATE_NAMES for lang in ("ja", "en")}


@pytest.mark.parametrize("name,lang", sorted(GOLDEN))
def test_shipped_template_renders_subject_and_key_lines(name, lang):
    tset = TemplateSet(SHIPPED, "ja")
    out = tset.render(name, sample_context(name, lang), language=lang)
    subject, lines = GOLDEN[(name, lang)]
    assert out.subject == subject
    text_lines = out.text.splitlines()
    for line in lines:
        assert line in text_lines, f"{line!r} not in {name}/{lang}:\n{out.text}"
    assert not out.text.startswith("Subject:") and "Subject:" not in text_lines[0]
    # Every shipped template has a simple HTML part that carries the case number.
    assert out.html is not None and out.html.lstrip().startswith("<!DOCTYPE html>")
    assert "CASE-1042" in out.html and f'lang="{lang}"' in out.html


def test_html_is_autoescaped_and_text_is_not():
    tset = TemplateSet(SHIPPED, "ja")
    out = tset.render("new_case_agent", sample_context("new_case_agent", "en"), language="en")
    assert "<thanks>" in out.text
    assert "&lt;thanks&gt;" in out.html and "<thanks>" not in out.html


def _folder(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / "tpl" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, "utf-8")
    return tmp_path / "tpl"


def test_lookup_falls_back_from_brand_to_default_and_to_the_default_language(tmp_path):
    folder = _folder(tmp_path, {
        "acme/en/ack.txt.j2": "Subject: acme en\nbody\n",
        "ja/ack.txt.j2": "Subject: default ja\nbody\n",
    })
    tset = TemplateSet(folder, "ja", shipped=None)
    ctx = sample_context("ack", "en")
    assert tset.render("ack", ctx, language="en", brand="acme").subject == "acme en"
    assert tset.render("ack", ctx, language="ja", brand="acme").subject == "default ja"  # brand → default
    assert tset.render("ack", ctx, language="fr", brand="other").subject == "default ja"  # language → default
    with pytest.raises(TemplateError, match="no template 'escalated'"):
        tset.render("escalated", ctx, language="en")


def test_configured_folder_overrides_and_shipped_templates_fill_the_gaps(tmp_path):
    folder = _folder(tmp_path, {"en/ack.txt.j2": "Subject: Thanks {{ recipient.name }}\nOwn text.\n"})
    tset = TemplateSet(folder, "ja")
    assert tset.render("ack", sample_context("ack", "en"), language="en").subject == "Thanks 山田 太郎"
    shipped = tset.render("auto_closed", sample_context("auto_closed", "en"), language="en")
    assert shipped.subject.startswith("[CASE-1042] Your case has been closed")


def test_an_unknown_variable_is_an_error_with_file_and_line(tmp_path):
    folder = _folder(tmp_path, {"en/ack.txt.j2": "Subject: x\nline 2\nHello {{ case.numbr }}\n"})
    with pytest.raises(TemplateError) as err:
        TemplateSet(folder, "en", shipped=None).render("ack", sample_context("ack", "en"), language="en")
    assert str(err.value).startswith(f"{folder / 'en' / 'ack.txt.j2'}:3: ")
    assert "numbr" in str(err.value)


def test_a_syntax_error_is_reported_with_file_and_line(tmp_path):
    folder = _folder(tmp_path, {"ja/ack.txt.j2": "Subject: x\n{% if case %}\nno end\n"})
    with pytest.raises(TemplateError) as err:
        TemplateSet(folder, "ja", shipped=None).render("ack", sample_context("ack", "ja"))
    assert str(err.value).startswith(f"{folder / 'ja' / 'ack.txt.j2'}:")
    assert err.value.line in (2, 3)


def test_the_first_line_must_set_the_subject(tmp_path):
    folder = _folder(tmp_path, {"ja/ack.txt.j2": "Hello\n"})
    with pytest.raises(TemplateError, match=r"ack.txt.j2:1: the first line must be 'Subject: …'"):
        TemplateSet(folder, "ja", shipped=None).render("ack", sample_context("ack", "ja"))


@pytest.mark.parametrize("source,reason", [
    ("{{ case.__class__.__mro__ }}", "SecurityError|UndefinedError"),
    ("{{ ''.__class__ }}", "SecurityError|UndefinedError"),
    ("{{ case.tags.append(1) }}", "SecurityError"),
    ("{{ 'x' * 50000000 }}", "repetition would make"),
    ("{{ 9 ** 99999999 }}", "exponent"),
    ("{% for i in range(100000) %}xxxxxxxxxx{% endfor %}", "output larger than"),
])
def test_the_sandbox_refuses_escapes_and_huge_output(tmp_path, source, reason):
    folder = _folder(tmp_path, {"en/ack.txt.j2": "Subject: x\n" + source + "\n"})
    start = time.monotonic()
    with pytest.raises(TemplateError, match=reason) as err:
        TemplateSet(folder, "en", max_output=100_000, shipped=None).render("ack", sample_context("ack", "en"))
    assert "ack.txt.j2:" in str(err.value)
    assert time.monotonic() - start < 30  # bounded: refused, not computed


def test_only_plain_data_reaches_a_template(tmp_path):
    folder = _folder(tmp_path, {"en/ack.txt.j2": "Subject: x\n{{ case }}\n"})
    ctx = sample_context("ack", "en")
    ctx["case"] = object()
    with pytest.raises(TypeError, match="plain data only"):
        TemplateSet(folder, "en", shipped=None).render("ack", ctx)


def test_templates_check_passes_on_the_shipped_templates(run_intake):
    res = run_intake("templates", "check")
    assert res.returncode == 0, res.stderr
    assert "40 template file(s) rendered" in res.stdout and "0 error(s)" in res.stdout


def test_templates_check_fails_with_file_and_line(run_intake, tmp_path):
    folder = _folder(tmp_path, {"ja/ack.txt.j2": "Subject: {{ case.number }}\n\n{{ case.nosuch }}\n",
                                "en/ack.html.j2": "<p>{% if %}</p>\n"})
    res = run_intake("templates", "check", str(folder))
    assert res.returncode == 1
    assert f"{folder / 'ja' / 'ack.txt.j2'}:3: " in res.stderr
    assert f"{folder / 'en' / 'ack.html.j2'}:1: " in res.stderr
