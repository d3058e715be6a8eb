"""bench.run --presets: each preset's run gets the other options, not --presets/--out/--workdir again."""

from __future__ import annotations

from bench.presets import without_option


def test_an_option_goes_with_its_value_in_either_spelling():
    argv = ["--presets", "team,fits", "--only", "proxy-ram0,llama", "--out=/tmp/x", "--skip-micro"]
    assert without_option(without_option(argv, "--presets"), "--out") == ["--only", "proxy-ram0,llama", "--skip-micro"]
    assert without_option(["--presets-x", "1"], "--presets") == ["--presets-x", "1"]
