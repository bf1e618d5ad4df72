"""The documentation's examples, extracted from the .rst files so tests run them as written."""

from __future__ import annotations

import re


def python_blocks(text: str) -> list[str]:
    """The bodies of the ``.. code-block:: python`` directives of an .rst text, dedented."""
    blocks = []
    for match in re.finditer(r"^\.\. code-block:: python\n((?:[ \t]*\n|   .*\n)+)", text, re.M):
        lines = match.group(1).splitlines()
        blocks.append("\n".join(line[3:] for line in lines).strip() + "\n")
    return blocks
