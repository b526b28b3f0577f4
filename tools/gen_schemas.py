"""Rewrite protocol/schemas/*.json from the pydantic models (``make schemas``)."""

from protocol.schema_files import SCHEMA_DIR, render

SCHEMA_DIR.mkdir(exist_ok=True)
for name, text in render().items():
    (SCHEMA_DIR / name).write_text(text)
    print(f"wrote {SCHEMA_DIR / name}")
