"""lit_qlp.config_files: the YAML loader of the CLI's parsers (its CLI behaviour is tested in tests/test_cli.py)."""

from __future__ import annotations

import pytest
import yaml

from lit_qlp.config_files import base60_scalars, load_config_yaml


@pytest.mark.parametrize(
    "text, found",
    [
        ("layers_to_transform: 1:3\n", [(1, "layers_to_transform", "1:3", 63)]),
        ("a:\n  b: 1\n  max_time: 1:00:00:00\n", [(3, "max_time", "1:00:00:00", 216000)]),
        ("items:\n  - 1:30.5\n", [(2, "", "1:30.5", 90.5)]),
        ("layers_to_transform: '1:3'\n", []),  # quoted: text
        ('layers_to_transform: "10:20"\n', []),
        ("layers_to_transform: 0:31\n", []),  # a leading 0 is no base-60 number: text
        ("layers_to_transform: 1:3,5\n", []),
        ("layers_to_transform: 3\n", []),
        ("partition_method: type:DecoderLayer\n", []),
        ("when: 2001-12-14 21:59:43\n", []),  # a timestamp, not a number
    ],
)
def test_base60_scalars(text, found):
    assert base60_scalars(text) == found


def test_command_line_values_load_as_in_yaml_mode():
    from jsonargparse import get_loader

    for value in ["1:3", "[{dataset_path: a.jsonl}]", "{a: 1}", "x: [1", "2.0e-3"]:
        try:
            expected = get_loader("yaml")(value)
        except yaml.YAMLError:
            with pytest.raises(yaml.YAMLError):
                load_config_yaml(value)
        else:
            assert load_config_yaml(value) == expected


def test_config_file_errors_name_the_file():
    assert load_config_yaml("a: '1:3'\nb: [1, 2]\n", "c.yaml") == {"a": "1:3", "b": [1, 2]}
    with pytest.raises(yaml.YAMLError, match=r"^c.yaml, line 2: YAML reads `b: 1:3` as the base-60 number 63; .*"):
        load_config_yaml("a: 1\nb: 1:3\n", "c.yaml")
    with pytest.raises(yaml.YAMLError, match=r"^c.yaml, line 2, column 2: invalid YAML: .*fix the file's syntax$"):
        load_config_yaml("a: [1\nb: 2\n", "c.yaml")
    with pytest.raises(yaml.YAMLError, match=r"^c.yaml: invalid YAML: "):
        load_config_yaml("a: \x07\n", "c.yaml")
