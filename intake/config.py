"""Configuration: a TOML file turned into frozen dataclasses, validated once.

Without a file, the embedded defaults of DESIGN.md 6 apply: SQLite ``./intake.db``,
SMTP on ``127.0.0.1:2525``, rules from ``./routing_rules``, templates from
``./templates``, outbound mail as ``.eml`` files in ``./outbox/`` and the two example
mailboxes ``support@example.com`` and ``billing@example.com``.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from intake.mail.addresses import base_address

if TYPE_CHECKING:
    from collections.abc import Callable

    from intake.business_hours import BusinessHours
    from intake.mail.auth import Authentication
    from intake.mail.parse import ParsedMail


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names file and key."""


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "sqlite:///intake.db"


@dataclass(frozen=True)
class SmtpConfig:
    listen: str = "127.0.0.1:2525"
    max_message_size: str = "25MB"
    hostname: str = ""
    protocol: str = "smtp"
    tls_cert: str = ""
    tls_key: str = ""
    max_connections: int = 100
    max_recipients: int = 100
    # What one client can hold (docs/smtp.md "Limits"): memory, slots and time.
    max_command_line: str = "4KB"  # longer command lines: 500 5.5.2; DATA lines may be as long as a message
    max_connections_per_ip: int = 50  # Postfix's smtpd_client_connection_count_limit
    max_session_time: str = "10m"
    command_timeout: str = "60s"  # for the next command
    data_timeout: str = "60s"  # between received pieces of a message
    # Who may hand mail over by LMTP (protocol = "lmtp"): our own MTA. LMTP is a final hop
    # inside the site, so mail arriving by it is judged by the MTA's headers (an agent's
    # Authentication-Results); a client from elsewhere could write those itself.
    lmtp_clients: tuple[str, ...] = ("127.0.0.0/8", "::1")


@dataclass(frozen=True)
class MailboxConfig:
    address: str
    queue: str = "support"
    brand: str = ""
    language: str = ""
    name: str = ""


@dataclass(frozen=True)
class ImapConfig:
    host: str
    mailbox: str
    username: str = ""
    port: int = 993
    tls: bool = True
    starttls: bool = False
    verify_tls: bool = True
    ca_file: str = ""
    password_env: str = ""
    folder: str = "INBOX"
    processed_folder: str = "Processed"
    keyword: str = "$Intake"
    poll_interval: int = 60
    idle: bool = True
    batch_size: int = 100
    name: str = ""

    @property
    def login(self) -> str:
        """The user name to log in with (default: the mailbox address)."""
        return self.username or self.mailbox

    @property
    def account(self) -> str:
        """The account's name in logs, ``intake status`` and the stored folder positions."""
        return self.name or self.login


@dataclass(frozen=True)
class OutboundConfig:
    mode: str = "maildir"
    path: str = "outbox"
    host: str = "localhost"
    port: int = 25
    starttls: bool = False
    ssl: bool = False
    username: str = ""
    password_env: str = ""
    give_up_after: str = "2d"
    # Delivery tuning and relay details (see config.example.toml).
    verify_tls: bool = True
    ca_file: str = ""
    timeout: float = 30.0
    batch_size: int = 100
    connections: int = 1
    retry_initial: str = "1m"
    retry_max: str = "1h"
    interval: float = 5.0
    installation: str = ""
    # A sending process renews its claims; one not renewed this long belongs to a process
    # that stopped, and its mail is queued again (docs/outbox.md).
    claim_expiry: str = "45s"


@dataclass(frozen=True)
class NotifyConfig:
    """Which mails a change causes, and the loop protection that limits them."""

    ack: bool = True
    notify_agents: bool = True
    ack_per_sender_per_hour: int = 5
    ack_per_case_per_hour: int = 2
    # Notices to one agent about their own mail (refused commands, unauthenticated mail):
    # anyone can send mail in an agent's name, and each would cause one.
    notices_per_agent_per_hour: int = 10
    loop_window: str = "10m"
    loop_max: int = 10
    suppress_after_failure: str = "7d"
    max_output: str = "256KB"
    # The customer's files attached to an agent notice, in all; the rest are listed.
    attach_max: str = "10MB"


@dataclass(frozen=True)
class ProcessingConfig:
    """How ``serve`` runs the processor (parse → … → notify) beside the listeners."""

    workers: int = 1  # child processes; 0 = a thread of the serve process
    batch_size: int = 50  # records per processing transaction
    nice: int = 10  # CPU priority of the workers below serve's (0-19; 0 = the same)


@dataclass(frozen=True)
class RulesConfig:
    # "" = ./routing_rules, or the shipped examples while that folder does not exist.
    path: str = ""
    budget: str = "1s"  # rule evaluation per message; longer: the message is quarantined naming the rule


@dataclass(frozen=True)
class TemplatesConfig:
    path: str = "templates"
    default_language: str = "ja"
    budget: str = "1s"  # one template rendering; longer: the last good version is used (else quarantined)


@dataclass(frozen=True)
class SecurityConfig:
    trusted_authserv_ids: tuple[str, ...] = ()
    verify_dkim: bool = False


@dataclass(frozen=True)
class CasesConfig:
    prefix: str = "CASE"
    reopen_days: int = 14  # a queue's reopen_days overrides it
    # People the requester's To/Cc make participants of a case, at most.
    max_participants: int = 20
    postmaster_queue: str = "support"  # where mail to postmaster@ each of our domains goes
    time_zone: str = "Asia/Tokyo"
    retention_days: int = 365
    # Mail domains that never make an organization (people, not companies).
    free_mail_domains: tuple[str, ...] = (
        "gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "live.com",
        "msn.com", "yahoo.com", "yahoo.co.jp", "ymail.com", "icloud.com", "me.com",
        "mac.com", "aol.com", "gmx.de", "gmx.net", "web.de", "proton.me",
        "protonmail.com", "mail.ru", "yandex.ru", "qq.com", "163.com",
        "docomo.ne.jp", "ezweb.ne.jp", "au.com", "softbank.ne.jp", "i.softbank.jp",
        "nifty.com", "biglobe.ne.jp", "ocn.ne.jp", "so-net.ne.jp",
    )


@dataclass(frozen=True)
class BusinessHoursConfig:
    """The support team's calendar (the ``business_hours`` rule condition)."""

    time_zone: str = ""  # "" = [cases] time_zone
    days: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri")
    hours: tuple[str, ...] = ("09:00-18:00",)
    holidays: str = "JP"  # country code of public holidays (holidays package); "" = none
    closed: tuple[str, ...] = ()  # company closures: "2026-12-29" once, "12-29" every year


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``base_dir`` anchors every relative path."""

    base_dir: Path = field(default_factory=Path.cwd)
    source: str = "<defaults>"
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    mailbox: tuple[MailboxConfig, ...] = (
        MailboxConfig(address="support@example.com", queue="support"),
        MailboxConfig(address="billing@example.com", queue="billing"),
    )
    imap: tuple[ImapConfig, ...] = ()
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    processing: ProcessingConfig = field(default_factory=ProcessingConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    templates: TemplatesConfig = field(default_factory=TemplatesConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    cases: CasesConfig = field(default_factory=CasesConfig)
    business_hours: BusinessHoursConfig = field(default_factory=BusinessHoursConfig)

    def path(self, value: str) -> Path:
        """Resolve a configured path relative to the config file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    @property
    def rules_path(self) -> Path:
        """The rules folder: ``[rules] path``; without one ``./routing_rules``, and the shipped
        example rules while that folder does not exist (so that a first start routes)."""
        if self.rules.path:
            return self.path(self.rules.path)
        own = self.path("routing_rules")
        if own.exists():
            return own
        from intake.shipped import ROUTING_RULES

        return ROUTING_RULES

    @property
    def rules_budget(self) -> float:
        """Seconds rule evaluation may take for one message (``[rules] budget``)."""
        return parse_duration(self.rules.budget)

    @property
    def templates_budget(self) -> float:
        """Seconds one template rendering may take (``[templates] budget``)."""
        return parse_duration(self.templates.budget)

    @property
    def templates_path(self) -> Path:
        """The templates folder (the shipped templates fill in what it lacks)."""
        return self.path(self.templates.path)

    def with_smtp_listen(self, listen: str) -> "Config":
        """This config with the SMTP listener on ``listen`` (``intake serve --smtp-listen``)."""
        from dataclasses import replace

        if listen and not _LISTEN.match(listen.strip()):
            raise ConfigError(f"--smtp-listen: expected host:port (e.g. 127.0.0.1:2525), got {listen!r}")
        return replace(self, smtp=replace(self.smtp, listen=listen.strip()))

    @property
    def database_url(self) -> str:
        """The database URL with a relative SQLite path anchored at ``base_dir``."""
        url = self.database.url
        m = re.match(r"^(sqlite(?:\+\w+)?:///)(?!/)(.+)$", url)
        if m and m.group(2) != ":memory:":
            return m.group(1) + str(self.path(m.group(2)))
        return url

    def mailbox_for(self, address: str) -> MailboxConfig | None:
        """The mailbox an address belongs to, plus-addresses included.

        ``postmaster@`` each domain of our mailboxes is one too (RFC 5321 4.5.1 requires
        accepting it): queue ``[cases] postmaster_queue``, brand and language of the first
        mailbox of that domain, unless a ``[[mailbox]]`` has that address itself.
        """
        base = base_address(address)
        for mb in self.mailbox:
            if mb.address.lower() == base:
                return mb
        local, _, domain = base.partition("@")
        if local == "postmaster" and domain:
            for mb in self.mailbox:
                if mb.address.lower().rpartition("@")[2] == domain:
                    return MailboxConfig(address=base, queue=self.cases.postmaster_queue, brand=mb.brand,
                                         language=mb.language, name=mb.name)
        return None

    @cached_property
    def own_addresses(self) -> frozenset[str]:
        """Every address intake receives for (without plus parts)."""
        return frozenset(mb.address.lower() for mb in self.mailbox)

    @cached_property
    def smtp_hostname(self) -> str:
        """The name intake's SMTP listener greets with and writes into its ``Received``."""
        import socket  # only serve and agent authentication need it, not every command

        return self.smtp.hostname or socket.getfqdn()

    def authenticator(self, raw: bytes) -> "Callable[[ParsedMail], Authentication]":
        """How ``classify`` checks that a mail from an agent's address is the agent's
        (DESIGN 5 "Who is an agent"), by ``[security]``."""
        sec = self.security

        def check(mail: "ParsedMail") -> "Authentication":
            from intake.mail.auth import authenticate  # DKIM and DNS are loaded for agents' mail only

            return authenticate(raw, mail, trusted_authserv_ids=sec.trusted_authserv_ids,
                                boundary_hosts=(*sec.trusted_authserv_ids, self.smtp_hostname),
                                verify_dkim=sec.verify_dkim)

        return check

    @property
    def installation(self) -> str:
        """The name our loop header carries: ``[outbound] installation`` or the first mailbox's domain."""
        return self.outbound.installation or self.mailbox[0].address.rpartition("@")[2].lower()

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.cases.time_zone)

    @property
    def calendar(self) -> "BusinessHours":
        """The business calendar of ``[business_hours]`` (validated at load)."""
        return _calendar(self.business_hours, self.cases.time_zone)

    def check_calendar(self) -> None:
        """Refuse a holiday country with no calendar (checked by the commands that route mail:
        loading holiday tables is too slow for every command)."""
        try:
            self.calendar
        except ValueError as exc:
            raise ConfigError(f"{self.source}: business_hours: {exc}") from None


@lru_cache(maxsize=16)
def _calendar(bh: BusinessHoursConfig, default_tz: str) -> "BusinessHours":
    from intake.business_hours import BusinessHours

    return BusinessHours.from_settings(time_zone=bh.time_zone or default_tz, days=bh.days, hours=bh.hours,
                                       holidays=bh.holidays, closed=bh.closed)


_LISTEN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):\d{1,5}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)i?b?\s*$", re.I)


def parse_size(text: str | int) -> int:
    """``"25MB"`` → bytes. Plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 25MB)")
    factor = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    return int(float(m.group(1)) * factor)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.I)


def parse_duration(text: str | int) -> float:
    """``"4h"``, ``"3d"``, ``"90s"`` → seconds. Plain numbers are seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 4h, 3d)")
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2).lower()]
    return float(m.group(1)) * unit


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.name not in ("base_dir", "source")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{_join(where, key)}: unknown key{hint}")
        kwargs[key] = _coerce(hints[key], value, _join(where, key))
    try:
        return cls(**kwargs)
    except TypeError as exc:
        missing = re.findall(r"'(\w+)'", str(exc))
        raise ConfigError(f"{where}: missing required key {', '.join(missing)}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


_PATH_PART = re.compile(r"^(\w+)(?:\[(\d+)\])?$")
_HEADER = re.compile(r"^\s*\[\[?\s*([\w.-]+)\s*\]\]?")


def _line_of(text: str, key: str) -> int:
    """The line of a TOML file that sets ``key`` (``smtp.listen``, ``mailbox[1].address``), so
    that an error reads ``file:line: reason``; 1 when it cannot be told."""
    parts = [_PATH_PART.match(part) for part in key.split(".")]
    if not parts or not all(parts):
        return 1
    table, index = parts[0].group(1), int(parts[0].group(2) or 0)  # type: ignore[union-attr]
    name = parts[1].group(1) if len(parts) > 1 else None  # type: ignore[union-attr]
    current, seen = None, -1
    for n, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            seen += current == table
            if current == table and seen == index and name is None:
                return n
            continue
        if current == table and seen == index and name and re.match(rf"^\s*{re.escape(name)}\s*=", line):
            return n
    return 1


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = getattr(hint, "__origin__", None)
    if is_dataclass(hint):
        return _build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        inner = hint.__args__[0]
        if is_dataclass(inner):
            return tuple(_build(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    expected = {str: str, int: int, bool: bool, float: (int, float)}.get(hint)
    if expected is not None:
        # bool is an int in Python; a TOML `true` is not a port number.
        if isinstance(value, bool) and hint is not bool:
            raise ConfigError(f"{where}: expected {hint.__name__}, got a boolean")
        if not isinstance(value, expected):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate a TOML config file; ``None`` gives the embedded defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    try:
        cfg = _build(Config, data, "")
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        raise ConfigError(f"{p}:{_line_of(p.read_text(encoding='utf-8'), key)}: {exc}") from None
    cfg = _replace(cfg, base_dir=p.resolve().parent, source=str(p))
    _validate(cfg, str(p))
    return cfg


def _located(where: str, key: str, reason: str) -> str:
    """``file:line: key: reason`` for a value that is the wrong kind of thing."""
    try:
        line = _line_of(Path(where).read_text(encoding="utf-8"), key)
    except OSError:
        line = 1
    return f"{where}:{line}: {key}: {reason}"


def _replace(cfg: Config, **changes: Any) -> Config:
    from dataclasses import replace

    return replace(cfg, **changes)


def _validate(cfg: Config, where: str) -> None:
    if not cfg.mailbox:
        raise ConfigError(f"{where}: at least one [[mailbox]] is needed")
    seen: set[str] = set()
    for mb in cfg.mailbox:
        if "@" not in mb.address:
            raise ConfigError(f"{where}: mailbox address {mb.address!r} is not an address")
        if mb.address.lower() in seen:
            raise ConfigError(f"{where}: mailbox {mb.address} is listed twice")
        seen.add(mb.address.lower())
    accounts: set[str] = set()
    for acct in cfg.imap:
        name = f"{where}: [[imap]] {acct.account}"
        if cfg.mailbox_for(acct.mailbox) is None:
            raise ConfigError(f"{name}: mailbox {acct.mailbox!r} is not a [[mailbox]]")
        if acct.account in accounts:
            raise ConfigError(f"{name}: listed twice (give each [[imap]] its own name)")
        accounts.add(acct.account)
        if not acct.password_env:
            raise ConfigError(f"{name}: password_env is required (the environment variable holding the password)")
        if acct.tls and acct.starttls:
            raise ConfigError(f"{name}: tls (implicit TLS) and starttls exclude each other")
        if acct.poll_interval < 1 or acct.batch_size < 1:
            raise ConfigError(f"{name}: poll_interval and batch_size must be at least 1")
        if acct.processed_folder == acct.folder:
            raise ConfigError(f"{name}: processed_folder must differ from folder")
        if not acct.processed_folder and not re.fullmatch(r"[^\\\s(){}%*\"\]]+", acct.keyword):
            raise ConfigError(f"{name}: keyword {acct.keyword!r} is not an IMAP keyword (e.g. $Intake)")
    try:
        parse_size(cfg.smtp.max_message_size)
        if parse_size(cfg.smtp.max_command_line) < 512:
            raise ValueError("smtp.max_command_line must be at least 512 bytes (RFC 5321 4.5.3.1.4)")
        for key in ("max_session_time", "command_timeout", "data_timeout"):
            if parse_duration(getattr(cfg.smtp, key)) <= 0:
                raise ValueError(f"smtp.{key} must be longer than 0s")
        parse_duration(cfg.outbound.give_up_after)
        parse_duration(cfg.outbound.retry_initial)
        parse_duration(cfg.outbound.retry_max)
        if parse_duration(cfg.outbound.claim_expiry) < 1:
            raise ValueError("outbound.claim_expiry must be at least 1s")
        parse_duration(cfg.notify.loop_window)
        parse_duration(cfg.notify.suppress_after_failure)
        parse_size(cfg.notify.max_output)
        parse_size(cfg.notify.attach_max)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for key in ("rules.budget", "templates.budget"):
        section, name = key.split(".")
        try:
            seconds = parse_duration(getattr(getattr(cfg, section), name))
        except ValueError as exc:
            raise ConfigError(_located(where, key, str(exc))) from None
        if not 0 < seconds <= 60:
            raise ConfigError(_located(where, key, "must be longer than 0s and at most 60s (e.g. 1s or 500ms as 0.5s)"))
    if cfg.outbound.mode not in ("maildir", "smtp"):
        raise ConfigError(f"{where}: outbound.mode must be 'maildir' or 'smtp'")
    if cfg.outbound.ssl and cfg.outbound.starttls:
        raise ConfigError(f"{where}: outbound: choose ssl (implicit TLS) or starttls, not both")
    if cfg.outbound.connections < 1 or cfg.outbound.batch_size < 1:
        raise ConfigError(f"{where}: outbound.connections and outbound.batch_size must be at least 1")
    if cfg.smtp.protocol not in ("smtp", "lmtp"):
        raise ConfigError(f"{where}: smtp.protocol must be 'smtp' or 'lmtp'")
    for net in cfg.smtp.lmtp_clients:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"{where}: smtp.lmtp_clients: {net!r} is not an IP address or network "
                              "(e.g. \"10.0.0.5\" or \"10.0.0.0/24\")") from None
    if cfg.smtp.listen and not _LISTEN.match(cfg.smtp.listen.strip()):
        raise ConfigError(f"{where}: smtp.listen: expected host:port (e.g. 127.0.0.1:2525), got {cfg.smtp.listen!r}")
    if bool(cfg.smtp.tls_cert) != bool(cfg.smtp.tls_key):
        raise ConfigError(f"{where}: smtp.tls_cert and smtp.tls_key go together (STARTTLS needs both)")
    if cfg.processing.workers < 0 or cfg.processing.batch_size < 1 or not 0 <= cfg.processing.nice <= 19:
        raise ConfigError(f"{where}: processing.workers must be 0 or more, processing.batch_size at least 1 "
                          "and processing.nice between 0 and 19")
    if cfg.smtp.max_connections < 1 or cfg.smtp.max_recipients < 1 or cfg.smtp.max_connections_per_ip < 1:
        raise ConfigError(f"{where}: smtp.max_connections, smtp.max_connections_per_ip and smtp.max_recipients "
                          "must be at least 1")
    try:
        ZoneInfo(cfg.cases.time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{where}: cases.time_zone: unknown time zone {cfg.cases.time_zone!r}") from None
    from intake.business_hours import BusinessHours

    bh = cfg.business_hours
    try:
        BusinessHours.from_settings(time_zone=bh.time_zone or cfg.cases.time_zone, days=bh.days, hours=bh.hours,
                                    holidays=bh.holidays, closed=bh.closed, check_country=False)
    except ValueError as exc:
        raise ConfigError(f"{where}: business_hours: {exc}") from None


def rules_changed_since(cfg: Config, at: str | None) -> bool:
    """Whether one of the installation's rule files is newer than ``at`` (an ISO time, as
    recorded with the rules state; None: never recorded)."""
    folder = cfg.rules_path
    try:
        newest = max((f.stat().st_mtime for f in folder.glob("*.yaml")), default=None) if folder.is_dir() else None
    except OSError:
        return False
    if newest is None:
        return False  # no rule files of its own: the shipped ones, which do not change
    return at is None or newest > datetime.fromisoformat(at).timestamp()
