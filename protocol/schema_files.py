"""The committed JSON Schema files: generated from ``protocol.messages``, never edited by hand.

``make schemas`` (tools/gen_schemas.py) rewrites them; a test fails when they are stale.
"""

from __future__ import annotations

import json
from pathlib import Path

from protocol.messages import SCHEMAS

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


def render() -> dict[str, str]:
    """File name -> file text for every schema."""
    return {
        f"{name}.schema.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True)
        + "\n"
        for name, model in SCHEMAS.items()
    }
