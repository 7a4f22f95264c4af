"""Documentation that code relies on stays in step with it."""

import dataclasses
import re

from helpers import REPO
from jaxeff.config import Config


def test_every_config_key_is_documented():
    text = (REPO / "docs/config.md").read_text()
    for section in dataclasses.fields(Config):
        heading = re.search(rf"^## {section.name}$(.*?)(?=^## |\Z)", text, re.M | re.S)
        assert heading, f"docs/config.md has no '## {section.name}' section"
        for f in dataclasses.fields(section.type if isinstance(section.type, type) else section.default_factory):
            assert f"`{f.name}`" in heading.group(1), f"{section.name}.{f.name} is missing from docs/config.md"


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    assert "make train" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci/run").read_text()
