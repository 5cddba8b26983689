"""``isession describe`` renders the argument specs' Ansible markup as plain text."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from isession import describe

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("markup", "text"), [
    ("C(lab)", "`lab`"),
    ('V("")', '`""`'),
    ("O(session_target=compute)", "`session_target=compute`"),
    ("I(important) and B(bold)", "important and bold"),
    ("see M(hpc.interactive.free_port)", "see hpc.interactive.free_port"),
    ("L(the docs, https://example.invalid/x)", "the docs <https://example.invalid/x>"),
    ("U(https://example.invalid/)", "https://example.invalid/"),
    ("RV(port) and E(HOME)", "`port` and `HOME`"),
    ("C(f(x\\)) stays", "`f(x\\)` stays"),
    ("a (plain) parenthesis and SOMETHING(else", "a (plain) parenthesis and SOMETHING(else"),
])
def test_plain(markup, text):
    assert describe.plain(markup) == text


@pytest.mark.parametrize("service", describe.services(REPO))
def test_every_service_description_has_no_markup(service):
    info = describe.describe(REPO, service)
    out = describe.format_text(info)
    left = re.findall(r"\b[ICBMUVOLREP]\(", out)
    assert not left, f"markup left in `isession describe {service}`: {left}\n{out}"
    assert info["session_inputs"] and any(r["description"] for r in info["service_inputs"])
