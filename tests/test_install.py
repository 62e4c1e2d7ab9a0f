"""A non-editable ``pip install .`` carries everything intake needs: migrations, the shipped
templates and example rules (package data), so that ``intake serve`` acknowledges a first mail."""

from __future__ import annotations

import email
import email.policy
import shutil
import smtplib
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from conftest import ROOT
from mailfactory import make_mail
from smtp_fixtures import free_port


def _source_tree(dest: Path) -> Path:
    """The project's files as a clean clone has them (no build output, no virtualenv)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)
    return dest


def test_a_non_editable_install_serves_and_acknowledges_with_the_shipped_templates(tmp_path):
    src = _source_tree(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # The dependencies come from the test's own environment; intake itself is built (in pip's
    # isolated build environment, as any user's install) and copied in, not linked to this checkout.
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", "utf-8")
    built = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(src)], timeout=600,
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    where = subprocess.run([str(py), "-c", "import intake.shipped as s; print(s.TEMPLATES)"], capture_output=True,
                           text=True, check=True, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(site)), where  # the installed copy, not this checkout
    assert (Path(where) / "ja" / "ack.txt.j2").is_file()

    run = tmp_path / "run"  # an empty folder: embedded defaults, shipped rules and templates
    run.mkdir()
    port = free_port()
    log = (run / "serve.log").open("wb")
    serve = subprocess.Popen([str(venv / "bin" / "intake"), "serve", "--smtp-listen", f"127.0.0.1:{port}"],
                             cwd=run, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client = smtplib.SMTP("127.0.0.1", port, timeout=30)
                break
            except OSError:
                assert serve.poll() is None and time.monotonic() < deadline, (run / "serve.log").read_text()
                time.sleep(0.1)
        with client:
            client.sendmail("taro@bigcorp.co.jp", ["support@example.com"],
                            make_mail(subject="請求書の件", sender="山田 太郎 <taro@bigcorp.co.jp>",
                                      body="請求書が届いていません。\n"))
        deadline = time.monotonic() + 60
        acks: list[Path] = []
        while not acks and time.monotonic() < deadline:
            acks = [p for p in (run / "outbox").glob("*-ack.eml")] if (run / "outbox").exists() else []
            time.sleep(0.1)
        assert acks, (run / "serve.log").read_text("utf-8", "replace")
    finally:
        serve.terminate()
        serve.wait(timeout=60)
        log.close()
    ack = email.message_from_bytes(acks[0].read_bytes(), policy=email.policy.default)
    assert ack["To"] == "山田 太郎 <taro@bigcorp.co.jp>"
    assert ack["Subject"] == "[CASE-1] お問い合わせを受け付けました：請求書の件"
    body = ack.get_body(("plain",)).get_content()
    assert "受付番号：CASE-1" in body and "山田 太郎 様" in body
    assert (run / "intake.db").exists()
