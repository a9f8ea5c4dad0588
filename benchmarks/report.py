"""The benchmarks' one way out: the markdown table on stdout, optionally to files too."""

import json
from typing import Optional


def emit(table: str, result: dict, out: Optional[str] = None, json_path: Optional[str] = None) -> None:
    """Print ``table``; write it to ``out`` and ``result`` as JSON to ``json_path`` when given."""
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
