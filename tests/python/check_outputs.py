"""Checks a model's outputs against what their request constrained them to.

    check_outputs.py OUTPUTS_FILE (--json-schema SCHEMA_FILE | --regex RE)

OUTPUTS_FILE holds a JSON array of strings. With --json-schema each must parse as JSON and
validate against the schema (the `jsonschema` package, the reference validator); with --regex
each must match RE as a whole (`re.fullmatch`). Prints one JSON line: `checked`, the number of
outputs, and `failures`, a list of [index, output, reason].
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import jsonschema


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("outputs", type=Path)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--json-schema", type=Path)
    which.add_argument("--regex")
    args = parser.parse_args()

    outputs = json.loads(args.outputs.read_text())
    failures = []
    if args.json_schema is not None:
        schema = json.loads(args.json_schema.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        validator = jsonschema.Draft202012Validator(schema)
        for index, output in enumerate(outputs):
            try:
                value = json.loads(output)
            except json.JSONDecodeError as e:
                failures.append([index, output, f"not JSON: {e}"])
                continue
            errors = [error.message for error in validator.iter_errors(value)]
            if errors:
                failures.append([index, output, "; ".join(errors)])
    else:
        pattern = re.compile(args.regex)
        for index, output in enumerate(outputs):
            if pattern.fullmatch(output) is None:
                failures.append([index, output, f"does not match {args.regex}"])
    print(json.dumps({"checked": len(outputs), "failures": failures}))


if __name__ == "__main__":
    main()
