"""How lit-qlp's CLI reads YAML: jsonargparse's own YAML loader, with errors that name the config file and the fix.

The CLI's parsers use ``parser_mode=PARSER_MODE``, registered here through jsonargparse's public ``set_loader``:
every value and file parses exactly as in jsonargparse's "yaml" mode, except that

- a config file with a YAML syntax error fails naming the file, line and column (jsonargparse says
  ``"<unicode string>"``);
- a plain scalar in a config file that YAML 1.1 reads as a base-60 number (``layers_to_transform: 1:3`` is the
  integer 63, ``max_time: 1:00:00:00`` is 216000) fails naming the file, line and key, with the quoted form to
  write instead. No lit-qlp option takes a base-60 number, and after parsing 63 cannot be told from a typed 63.
"""

from __future__ import annotations

from typing import Any

PARSER_MODE = "lit_qlp_yaml"
YAML_INT = "tag:yaml.org,2002:int"
YAML_FLOAT = "tag:yaml.org,2002:float"


def base60_scalars(stream: str) -> list[tuple[int, str, str, Any]]:
    """``(line, key, text, number)`` of each plain scalar in ``stream`` that YAML 1.1 reads as a base-60 number.

    YAML 1.1 resolves ``[-+]?[1-9][0-9_]*(:[0-5]?[0-9])+`` as an integer (``1:3`` = 1·60 + 3 = 63) and the same with
    a fraction as a float; a ``:`` inside a plain scalar resolved as a number occurs only in these forms. ``key`` is
    the mapping key the scalar is the value of ("" for a list item or the document itself); ``line`` counts from 1.
    """
    import yaml

    found: list[tuple[int, str, str, Any]] = []

    def visit(node: yaml.Node, key: str) -> None:
        if isinstance(node, yaml.ScalarNode):
            if node.style is None and node.tag in (YAML_INT, YAML_FLOAT) and ":" in node.value:
                number = yaml.safe_load(node.value)
                found.append((node.start_mark.line + 1, key, node.value, number))
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                visit(item, "")
        elif isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                visit(value_node, key_node.value if isinstance(key_node, yaml.ScalarNode) else "")

    for document in yaml.compose_all(stream, Loader=yaml.SafeLoader):
        if document is not None:
            visit(document, "")
    return found


def load_config_yaml(stream: str, path: str = "") -> Any:
    """jsonargparse's YAML loader, checking a config file first.

    Args:
        stream: The text: a whole config file, or one command-line value.
        path: The config file's name (jsonargparse passes the base name); "" for a command-line value, which loads
            exactly as in "yaml" mode.

    Raises:
        yaml.YAMLError: (what jsonargparse reports as a parse error) for a config file with a syntax error or a
            base-60 number, naming ``path``, the line and what to change.
    """
    import yaml
    from jsonargparse import get_loader

    if not path:
        return get_loader("yaml")(stream)
    try:
        numbers = base60_scalars(stream)
    except yaml.MarkedYAMLError as error:
        mark, context_mark = error.problem_mark, error.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        context = f" ({error.context}, line {context_mark.line + 1})" if error.context and context_mark else ""
        problem = error.problem or error.context or "cannot parse"
        raise yaml.YAMLError(f"{where}: invalid YAML: {problem}{context}; fix the file's syntax") from None
    except yaml.YAMLError as error:  # e.g. a character YAML does not allow
        raise yaml.YAMLError(f"{path}: invalid YAML: {error}; fix the file") from None
    if numbers:
        line, key, text, number = numbers[0]
        entry = f"{key}: {text}" if key else text
        quoted = f"{key}: '{text}'" if key else f"'{text}'"
        raise yaml.YAMLError(
            f"{path}, line {line}: YAML reads `{entry}` as the base-60 number {number}; if the text {text!r} is "
            f"meant (a layer range, a time), quote it: {quoted}"
        )
    return get_loader("yaml")(stream)


def register() -> str:
    """Registers ``load_config_yaml`` as jsonargparse's loader of ``PARSER_MODE`` (idempotent); returns the mode."""
    import yaml
    from jsonargparse import set_loader

    set_loader(PARSER_MODE, load_config_yaml, exceptions=(yaml.YAMLError,))
    return PARSER_MODE


__all__ = ["PARSER_MODE", "base60_scalars", "load_config_yaml", "register"]
