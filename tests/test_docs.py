"""Documentation that code relies on stays in step with it: the config reference and its JSON schema."""

import json
import subprocess

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from helpers import REPO, jaxeff_cmd, subprocess_env
from jaxeff.config import Config
from jaxeff.config.reference import DOCS_FILE, SCHEMA_FILE, json_schema, markdown, schema_text


def test_config_reference_is_generated_from_the_models():
    assert (REPO / DOCS_FILE).read_text() == markdown(), "docs/config.md is stale: run `make docs`"
    assert (REPO / SCHEMA_FILE).read_text() == schema_text(), "configs/jaxeff.schema.json is stale: run `make docs`"


def _sections(cls: type[BaseModel], prefix: str = ""):
    yield prefix, cls
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _sections(field.annotation, f"{prefix}{name}.")


def test_schema_is_valid_json_schema_and_documents_every_field():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    defs = schema["$defs"]
    docs = (REPO / DOCS_FILE).read_text()
    for prefix, cls in _sections(Config):
        node = schema if not prefix else defs[cls.__name__]
        assert node.get("additionalProperties") is False, f"{prefix or 'top level'} accepts unknown keys"
        for name in cls.model_fields:
            prop = node["properties"][name]
            assert prop.get("description"), f"{prefix}{name} has no description (add a docstring under the field)"
            annotation = cls.model_fields[name].annotation
            is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            row_or_heading = f"## {name}\n" if not prefix and is_section else f"| `{name}` |"
            assert row_or_heading in docs, f"{prefix}{name} is missing from docs/config.md"


def test_every_shipped_config_matches_the_schema_and_a_typo_does_not():
    validator = jsonschema.Draft202012Validator(json_schema())
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert path.read_text().startswith("# yaml-language-server: $schema=jaxeff.schema.json\n"), path.name
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path.name
    bad = {"model": {"lightning": {"blok_size": 3}}, "train": {"steps": "ten"}}
    messages = sorted(e.message for e in validator.iter_errors(bad))
    assert any("blok_size" in m for m in messages) and any("'ten' is not of type 'integer'" in m for m in messages)


@pytest.mark.parametrize("to_file", [False, True])
def test_config_schema_command(tmp_path, to_file):
    out = tmp_path / "schema.json"
    proc = subprocess.run([*jaxeff_cmd(), "config-schema", *(["--out", str(out)] if to_file else [])],
                          capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text() if to_file else proc.stdout) == json_schema()


def test_config_schema_to_an_unwritable_place_is_one_line(tmp_path):
    proc = subprocess.run([*jaxeff_cmd(), "config-schema", "--out", str(tmp_path / "missing" / "schema.json")],
                          capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert proc.returncode == 2 and "cannot write the schema there" in proc.stderr and "Traceback" not in proc.stderr


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    assert "make train" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci/run").read_text()


def test_the_hardware_figures_in_the_docs_are_the_code_s():
    from jaxeff.parallel.hardware import chip_table_markdown

    text = (REPO / "docs/hardware.md").read_text()
    block = text[text.index("<!-- chips:start -->") + len("<!-- chips:start -->"):text.index("<!-- chips:end -->")]
    assert block.strip() == chip_table_markdown(), "docs/hardware.md's chip table is stale: paste chip_table_markdown()"
