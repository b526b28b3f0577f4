"""Rewrite protocol/schemas/*.json and the docs' catalogue tables (``make schemas``)."""

from protocol.schema_files import SCHEMA_DIR, render, render_docs

SCHEMA_DIR.mkdir(exist_ok=True)
for name, text in render().items():
    (SCHEMA_DIR / name).write_text(text)
    print(f"wrote {SCHEMA_DIR / name}")
for path, text in render_docs().items():
    if path.read_text() != text:
        path.write_text(text)
        print(f"updated the catalogue tables in {path}")
