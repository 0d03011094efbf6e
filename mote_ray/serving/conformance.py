"""Validate our responses against the official OpenAI API description (openapi.yaml, read from where
the caller keeps it — tests and benchmarks pass ../shared/openai/openapi.yaml; never vendored).

The document is OpenAPI 3.1 but still marks optional values with 3.0's `nullable: true`, which JSON
Schema ignores; `nullable` is turned into `anyOf [..., null]` so `finish_reason: null` in a stream
chunk is judged as the OpenAI clients judge it. Extra fields (our `mote`) are allowed: the schemas do
not forbid additional properties.
"""

from __future__ import annotations

import functools
from pathlib import Path

URN = "urn:openai-openapi"


def _nullable(node):
    if isinstance(node, dict):
        node = {k: _nullable(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


@functools.lru_cache(maxsize=2)
def load_spec(path: str) -> dict:
    import yaml

    with open(path) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.lru_cache(maxsize=8)
def validator(spec_path: str, schema: str):
    """A jsonschema validator for components/schemas/<schema> of the spec at `spec_path`."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    doc = _nullable(load_spec(str(Path(spec_path).resolve())))
    registry = Registry().with_resource(URN, Resource(contents=doc, specification=DRAFT202012))
    return Draft202012Validator({"$ref": f"{URN}#/components/schemas/{schema}"}, registry=registry)


def violations(spec_path: str, schema: str, instance) -> list[str]:
    """Each way `instance` breaks the schema, as 'path: message' (empty when it conforms)."""
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '.'}: {e.message[:200]}"
            for e in validator(spec_path, schema).iter_errors(instance)]
