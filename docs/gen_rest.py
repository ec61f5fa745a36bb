"""Write docs/rest.md from the control plane's OpenAPI document: python docs/gen_rest.py"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from control_plane.api.openapi import build_openapi, to_markdown  # noqa: E402
from control_plane.api.routes import ROUTES  # noqa: E402

if __name__ == "__main__":
    out = ROOT / "docs" / "rest.md"
    out.write_text(to_markdown(build_openapi(ROUTES)))
    print(f"wrote {out.relative_to(ROOT)}")
