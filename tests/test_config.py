"""Settings, declared once: the environment, keyword construction and the DAG Params agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgsim.config import PROJECT_ROOT, ConfigError, Settings, setting_default
from imgsim.params import setting_param, setting_schema


def test_bare_settings_are_the_declared_defaults_whatever_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IMGSIM_BATCH_SIZE", "7")
    assert Settings().batch_size == setting_default("batch_size") == 32
    assert Settings.from_env().batch_size == 7
    assert Settings().data_root == (PROJECT_ROOT / "data").resolve()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"IMGSIM_BATCH_SIZE": "many"}, "IMGSIM_BATCH_SIZE='many' is not an integer"),
        ({"IMGSIM_BATCH_SIZE": "0"}, "IMGSIM_BATCH_SIZE='0' must be >= 1"),
        ({"IMGSIM_SCAN_SHARE": "25"}, r"IMGSIM_SCAN_SHARE='25' must be <= 1.0 \(a share"),
        ({"IMGSIM_LSH_NUM_HASH_TABLES": "513"}, "IMGSIM_LSH_NUM_HASH_TABLES='513' must be <= 512$"),
        ({"IMGSIM_TARGET_RECALL": "nan"}, "IMGSIM_TARGET_RECALL='nan' is not a number"),
        ({"IMGSIM_INDEX_START_DATE": "01/02/2026"}, "IMGSIM_INDEX_START_DATE=.*YYYY-MM-DD"),
    ],
)
def test_a_bad_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        Settings.from_env()


def test_replace_validates_like_construction(tmp_path: Path) -> None:
    settings = Settings(data_root=tmp_path)
    assert settings.replace(batch_size=8).batch_size == 8
    assert settings.replace(batch_size=8).data_root == tmp_path.resolve()
    with pytest.raises(ConfigError, match="IMGSIM_BATCH_SIZE=0 must be >= 1"):
        settings.replace(batch_size=0)


def test_a_param_takes_its_settings_default_limits_choices_and_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IMGSIM_LSH_NUM_HASH_TABLES", "6")
    param = setting_param(Settings.from_env(), "lsh_num_hash_tables")
    assert param.value == 6
    assert param.schema["type"] == "integer"
    assert (param.schema["minimum"], param.schema["maximum"]) == (0, 512)
    assert param.schema["title"] == "LSH hash tables (numHashTables, 0 = auto)"
    assert setting_schema("backbone")["enum"] == ["resnet18", "efficientnet_lite0", "random"]
    assert setting_schema("min_label_coverage")["maximum"] == 1
    nullable = setting_param(Settings(), "labels_checksum", default=None, type=["null", "string"])
    assert nullable.value is None and nullable.schema["type"] == ["null", "string"]
