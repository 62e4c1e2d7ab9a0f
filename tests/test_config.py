"""Configuration: the example file, the embedded defaults, and errors a person can act on."""

from __future__ import annotations

from pathlib import Path

import pytest

from intake.config import Config, ConfigError, load_config, parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_loads_and_matches_the_embedded_defaults():
    example = load_config(ROOT / "config.example.toml")
    defaults = Config()
    assert [m.address for m in example.mailbox] == [m.address for m in defaults.mailbox] == [
        "support@example.com", "billing@example.com"]
    for section in ("database", "smtp", "outbound", "processing", "rules", "templates", "cases"):
        assert getattr(example, section) == getattr(defaults, section), section


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "c.toml").write_text('[database]\nurl = "sqlite:///data/i.db"\n[rules]\npath = "r"\n')
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.database_url == f"sqlite:///{tmp_path}/data/i.db"
    assert cfg.path(cfg.rules.path) == tmp_path / "r"


def test_unknown_key_is_refused_with_a_suggestion(tmp_path):
    (tmp_path / "c.toml").write_text('[smtp]\nlisen = "127.0.0.1:25"\n')
    with pytest.raises(ConfigError, match=r"c.toml:2: smtp.lisen: unknown key \(did you mean 'listen'\?\)"):
        load_config(tmp_path / "c.toml")


@pytest.mark.parametrize(
    "text,message",
    [
        ('[smtp]\nmax_recipients = "many"\n', "expected int"),
        ('[smtp]\nmax_message_size = "big"\n', "not a size"),
        ('[[mailbox]]\naddress = "support"\n', "not an address"),
        ('[[mailbox]]\naddress = "a@x.jp"\n[[mailbox]]\naddress = "A@x.jp"\n', "listed twice"),
        ('[[mailbox]]\nqueue = "x"\n', "missing required key address"),
        ('[cases]\ntime_zone = "Mars/Olympus"\n', "unknown time zone"),
        ("[processing]\nworkers = -1\n", "processing.workers must be 0 or more"),
        ("[processing]\nnice = 25\n", "processing.nice between 0 and 19"),
        ("[smtp\n", "c.toml"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path, text, message):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "c.toml")


def test_sizes_and_durations():
    assert parse_size("25MB") == 25 * 1024 * 1024
    assert parse_size("512k") == 512 * 1024
    assert parse_duration("2d") == 172800
    assert parse_duration("90s") == 90


def test_plus_addresses_belong_to_their_mailbox():
    cfg = Config()
    assert cfg.mailbox_for("Support+c12-abc@Example.com").address == "support@example.com"
    assert cfg.mailbox_for("sales@example.com") is None


def test_cli_reports_a_bad_config_without_a_traceback(run_intake, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[database]\nurl = 5\n')
    res = run_intake("cases", "list", config=bad)
    assert res.returncode != 0
    assert "database.url: expected str" in res.stderr
    assert "Traceback" not in res.stderr


def test_db_upgrade_reports_the_revision(run_intake):
    res = run_intake("db", "upgrade", check=True)
    assert "database at revision" in res.stdout
