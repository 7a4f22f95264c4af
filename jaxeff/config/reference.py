"""The config's JSON schema and its reference page (docs/config.md), both generated from the sections.

    python -m jaxeff.config.reference --write     # (make docs) rewrite docs/config.md and configs/jaxeff.schema.json

A test compares the committed files with what this module generates, so they cannot go stale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from jaxeff.config.errors import allowed_range, type_name
from jaxeff.config.resume import may_change_on_resume
from jaxeff.config.sections import Config

SCHEMA_FILE = "configs/jaxeff.schema.json"
DOCS_FILE = "docs/config.md"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of a config file; descriptions are the fields' docstrings."""
    schema = Config.model_json_schema()
    return {"$schema": JSON_SCHEMA_DIALECT, "title": "jaxeff run config", **{k: v for k, v in schema.items()
                                                                          if k != "title"}}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


_INTRO = """\
# Configuration reference

<!-- Generated from jaxeff/config/sections.py, mixers.py and the mixer registry (jaxeff/layers) by `make docs`; edit those, not this file. -->

A run is configured by one YAML file (see `configs/`) plus dotted overrides on the command line
(`train.steps=100`, `model.mixer_pattern=[attention,attention]`, `model.lightning.impl=chunked`).
Values are parsed as YAML and checked against pydantic models (`jaxeff/config/`) with strict types:
unknown keys (with a did-you-mean), wrong types and inconsistent values stop the run with exit code 2
and one line naming the key, before anything compiles. The resolved config is written to
`<workdir>/config.yaml` and reads back to the same config.

Settings that belong to one mixer family live in that family's section under `model` (for example
`model.lightning.block_size`). A section's values are checked even when no layer uses the mixer;
its consistency checks with the rest of the config (LRPE layers vs `model.n_layers`, block size vs
`data.seq_len`) run only when `model.mixer_pattern` uses it. Keys that moved into a section (for
example the old `model.lightning_impl`) are refused with the new name; workdirs and exports written
before the move still load.

## Editor support

`jaxeff config-schema` prints the JSON schema of this file format (`--out FILE` writes it);
`configs/jaxeff.schema.json` is a committed copy. With the YAML language server (VS Code's Red Hat
YAML extension, or any LSP editor running `yaml-language-server`), a first line

```yaml
# yaml-language-server: $schema=jaxeff.schema.json
```

(a path relative to the YAML file, or a URL) gives key completion, hover documentation and
underlined typos and wrong types while typing. Every file in `configs/` starts with it. For your
own configs elsewhere, run `jaxeff config-schema --out jaxeff.schema.json` next to them, or map the
schema to a glob in the editor's settings (`"yaml.schemas": {"/path/to/jaxeff.schema.json":
"configs/*.yaml"}` in VS Code).

## Resuming with other settings

`jaxeff train` on a workdir that holds checkpoints resumes it. Settings marked *may change* in the
tables below can differ from the saved run (for example a smaller mesh after losing half a
cluster: Orbax reshards the checkpoint); the run prints `changed on resume: ...` once. The others
define the parameters' shapes, the data order or the random streams: a different value is refused
with the key named. The number of processes may change too. `train.grad_clip` may change, but not
between 0 and a positive value (that changes the optimizer state's layout).
"""


def _default(field) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _choices(field) -> str:
    """': `a`, `b`' for a list whose items the schema enumerates (registered mixer names), else ''."""
    extra = field.json_schema_extra
    if not callable(extra):
        return ""
    schema: dict[str, Any] = {}
    extra(schema)
    names = schema.get("items", {}).get("enum")
    return ": " + ", ".join(f"`{n}`" for n in names) if names else ""


def _section_tables(cls: type[BaseModel], name: str) -> list[str]:
    out = [f"## {name}", "", _one_line(cls.__doc__), "",
           "| key | type | default | on resume | meaning |", "|---|---|---|---|---|"]
    subsections = []
    for key, field in cls.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            subsections.append((f"{name}.{key}", annotation))
            out.append(f"| `{key}` | section | | | {_one_line(field.description)}: see [{name}.{key}](#{(name + key).replace('.', '')}) |")
            continue
        resume = "may change" if may_change_on_resume(cls, key) else "fixed"
        kind = type_name(annotation) + (f", {allowed_range(field.metadata)}" if field.metadata and
                                        allowed_range(field.metadata) != "in range" else "")
        out.append(f"| `{key}` | {_one_line(kind)} | {_default(field)} | {resume} | "
                   f"{_one_line(field.description)}{_choices(field)} |")
    out.append("")
    for sub_name, sub_cls in subsections:
        out += _section_tables(sub_cls, sub_name)
    return out


def _top_level_table() -> list[str]:
    """Settings at the top level of the file (not inside a section), e.g. `task`."""
    out = ["## top level", "", "| key | type | default | on resume | meaning |", "|---|---|---|---|---|"]
    for key, field in Config.model_fields.items():
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            resume = "may change" if may_change_on_resume(Config, key) else "fixed"
            out.append(f"| `{key}` | {_one_line(type_name(field.annotation))} | {_default(field)} | {resume} | "
                       f"{_one_line(field.description)} |")
    return out + [""]


def markdown() -> str:
    lines = [_INTRO] + _top_level_table()
    for name, field in Config.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            lines += _section_tables(field.annotation, name)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate docs/config.md and configs/jaxeff.schema.json.")
    parser.add_argument("--write", action="store_true", help="write the files (default: say which are stale)")
    parser.add_argument("--root", default=".", help="repository root (default: the current directory)")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in ((DOCS_FILE, markdown()), (SCHEMA_FILE, schema_text())):
        path = Path(args.root) / rel
        if path.exists() and path.read_text() == text:
            continue
        stale.append(rel)
        if args.write:
            path.write_text(text)
    verb = "rewrote" if args.write else "stale (run make docs)"
    print(f"{verb}: {', '.join(stale)}" if stale else "docs/config.md and configs/jaxeff.schema.json are up to date")
    return 1 if stale and not args.write else 0


if __name__ == "__main__":
    raise SystemExit(main())
