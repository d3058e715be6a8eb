"""A key per backend in the configuration (issue 20): parsed, checked, and who gets which."""

from __future__ import annotations

import pytest

from proxycache.config import Config, ConfigError, upstream_keys

A, B, C = "http://127.0.0.1:8080", "http://127.0.0.1:8081", "http://127.0.0.1:8082"


def keys(**settings: str) -> dict[str, str | None]:
    return upstream_keys(Config.load(settings, environ={}))


def test_each_backend_gets_its_own_key_else_the_common_one():
    assert keys(llama_url=f"{A},{B},{C}", upstream_api_key="common", backend_api_keys=f"{B}=own, {C}=") == {
        A: "common", B: "own", C: None,
    }
    assert keys(llama_url=A) == {A: None}
    assert keys(llama_url=A, backend_api_keys=f"{A}=a=b==") == {A: "a=b=="}  # base64 padding is no separator


def test_a_key_for_a_backend_that_is_not_configured_or_a_bad_item_is_refused():
    with pytest.raises(ConfigError, match="not among the --llama-url"):
        keys(llama_url=A, backend_api_keys=f"{B}=own")
    with pytest.raises(ConfigError, match="not URL=KEY"):
        keys(llama_url=A, backend_api_keys=A)
    with pytest.raises(ConfigError, match="IPv6"):
        keys(llama_url=A, backend_api_keys="http://[::1]:8080=k")


def test_print_config_does_not_show_the_keys(capsys):
    from proxycache.service import Options

    options = Options()
    with pytest.raises(SystemExit):
        options.parseOptions(
            ["--llama-url", f"{A},{B}", "--backend-api-keys", f"{A}=secret-one {B}=", "--print-config"]
        )
    printed = capsys.readouterr().out
    assert "secret-one" not in printed and f"{A}=(set) {B}=" in printed
