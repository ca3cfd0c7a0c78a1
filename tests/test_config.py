"""Settings read from FARM_* variables: the export name template is checked when they are read."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from farm.config import ConfigError, load_settings
from farm.filenames import DEFAULT_EXPORT_NAME


def test_the_export_name_defaults_to_batch_folder_item_prompt_and_seed():
    assert load_settings({}).export_name == DEFAULT_EXPORT_NAME == "{batch}/{item:04d}-{prompt:40}-{seed}"
    custom = "{batch_name}/{rank}-{model}-{prompt:20}-{seed}"
    assert load_settings({"FARM_EXPORT_NAME": custom}).export_name == custom


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{batch}/{promt:40}", "{promt} is not a field (did you mean {prompt}?)"),
        ("{batch}/{prompt:x}", "{prompt:x}: a text field takes only a width"),
        ("{item:q}-{seed}", "{item:q}: Unknown format code 'q'"),
        ("../{seed}", "'..' folder"),
    ],
)
def test_a_bad_export_name_is_refused_when_settings_are_read_naming_the_variable_and_the_fix(
    template, problem
):
    with pytest.raises(ConfigError) as info:
        load_settings({"FARM_EXPORT_NAME": template})
    message = str(info.value)
    assert message.startswith(f"FARM_EXPORT_NAME={template!r} cannot be used: ")
    assert problem in message
    assert "Fix: build the name from the fields {batch}, {batch_name}, {item}" in message
    assert f"as the default {DEFAULT_EXPORT_NAME!r} does, or unset FARM_EXPORT_NAME" in message


def test_the_cli_stops_at_start_on_a_bad_export_name(monkeypatch, tmp_path):
    from farm.cli import cli

    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    monkeypatch.setenv("FARM_EXPORT_NAME", "{seed:zz}")
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 1
    assert "FARM_EXPORT_NAME='{seed:zz}' cannot be used" in result.output
    assert not (tmp_path / "farm.db").exists(), "nothing was started or written"
