"""The three sets of reply-stripping cases, read from their manifests.

Shared by ``tests/test_quotes.py`` and ``bench/quotes_bench.py`` so that both score the same
cases the same way: the two public trimming corpora copied into ``tests/corpus/`` and our
hand-written samples in ``tests/replies/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Set name → folder holding its manifest.json.
SETS: dict[str, Path] = {
    "discourse": HERE / "corpus" / "discourse_email_reply_trimmer",
    "github": HERE / "corpus" / "github_email_reply_parser",
    "replies": HERE / "replies",
}


@dataclass(frozen=True)
class ReplyCase:
    """One reply body and, when its source states one, the new text expected from it."""

    id: str
    text: str
    html: str | None
    expected: str | None

    @property
    def scored(self) -> bool:
        return self.expected is not None


def _read(folder: Path, name: str) -> str:
    # The corpora are byte-exact copies: decode without touching line ends.
    return (folder / name).read_bytes().decode("utf-8")


def load(name: str) -> list[ReplyCase]:
    """Every case of one set, scored or not, in manifest order."""
    folder = SETS[name]
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    cases = []
    for c in manifest["cases"]:
        exp = c.get("expected", {})
        expected = exp.get("reply_text")
        if "reply_path" in exp:
            expected = _read(folder, exp["reply_path"])
        if expected is not None and exp.get("reply_compare", "strip") != "strip":
            raise ValueError(f"{c['id']}: only reply_compare 'strip' is known")
        if c.get("input_type", "text") != "text" and "raw_path" in c:
            raise ValueError(f"{c['id']}: only text bodies are known")
        text_file = c.get("raw_path") or c.get("text_path")
        text = _read(folder, text_file) if text_file else ""  # an HTML-only mail
        html = _read(folder, c["html_path"]) if "html_path" in c else None
        cases.append(ReplyCase(c["id"], text, html, expected))
    return cases


def exact(got: str | None, expected: str) -> bool:
    """The comparison all three sets use: equal after stripping white space at both ends."""
    return got is not None and got.strip() == expected.strip()
