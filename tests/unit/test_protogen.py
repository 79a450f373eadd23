"""The committed generated code matches the .proto sources (run `make proto` when it fails)."""

from __future__ import annotations

from gateway._protogen import check


def test_generated_code_is_current() -> None:
    assert check() == []
