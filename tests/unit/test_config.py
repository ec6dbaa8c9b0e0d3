from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import LEGACY_MODEL_NAME, Settings, build_parser, load_settings


def test_defaults_match_the_documented_ports():
    """The documented numbers themselves (README, chart, Dockerfile), not read from Settings."""
    settings = Settings()
    assert settings.grpc_port == 50051
    assert settings.reflection is True
    assert settings.model.endswith("Qwen2.5-Coder-0.5B-Instruct")


def test_every_setting_is_a_flag_with_help_naming_its_env_var():
    help_text = build_parser().format_help()
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in help_text
        assert f"QWEN_{name.upper()}" in help_text


def test_flags_override_env_which_overrides_defaults(monkeypatch):
    monkeypatch.setenv("QWEN_GRPC_PORT", "6000")
    monkeypatch.setenv("QWEN_MAX_TOKENS_DEFAULT", "99")
    settings = load_settings(["--grpc-port", "7000"])
    assert settings.grpc_port == 7000
    assert settings.max_tokens_default == 99


def test_served_model_names_from_csv(monkeypatch):
    monkeypatch.setenv("QWEN_SERVED_MODEL_NAME", f"edge-qwen, {LEGACY_MODEL_NAME}")
    assert load_settings([]).served_model_name == ["edge-qwen", LEGACY_MODEL_NAME]
    assert load_settings(["--served-model-name", "a,b"]).served_model_name == ["a", "b"]


def test_boolean_flags(monkeypatch):
    assert load_settings(["--no-reflection"]).reflection is False
    monkeypatch.setenv("QWEN_REFLECTION", "false")
    assert load_settings([]).reflection is False


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["--grpc-port", "70000"], "grpc_port"),
        (["--max-tokens-default", "5000", "--max-tokens-limit", "100"], "max_tokens_default must not exceed"),
        (["--max-tokens-limit", "9000", "--max-model-len", "4096"], "max_tokens_limit must be below max_model_len"),
        (["--temperature-default", "-1"], "temperature_default"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_setting(argv, reason):
    with pytest.raises(ValidationError, match=reason):
        load_settings(argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--quantization", "int3"], "argument --quantization: invalid choice: 'int3'"),
        (["--grpc-prot", "7000"], "unrecognized arguments: --grpc-prot 7000"),
    ],
)
def test_bad_flags_exit_2_saying_why(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_settings(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_readme_configuration_table_is_current():
    import pathlib

    from service.config import settings_table

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert settings_table() in readme, "README table is stale: paste `python -m service.config` into README.md"


def test_factory_defaults_are_documented():
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            assert (field.json_schema_extra or {}).get("doc_default"), f"{name} needs doc_default"
