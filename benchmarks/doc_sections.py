"""Generated blocks in the docs: a benchmark's output lives between its own begin/end markers
inside a `## ` section of a Markdown file, and rerunning the benchmark replaces only that block
(the section's analysis around it, and the other sections, are kept)."""

from __future__ import annotations

from pathlib import Path


def write_section(doc: Path, title: str, generated: str, begin: str, end: str,
                  new_file: str = "# Performance\n") -> None:
    """Replace the block `begin`..`end` of section `title` in `doc` with `generated` (which
    includes the markers). The file is re-read right before writing (others edit other
    sections); a missing section is appended, a missing file created with `new_file`."""
    text = doc.read_text() if doc.exists() else new_file
    start = text.find(title)
    if start < 0:
        text = text.rstrip("\n") + f"\n\n{title}\n\n{generated}\n"
    else:
        nxt = text.find("\n## ", start + len(title))
        end_of_section = len(text) if nxt < 0 else nxt + 1
        section = text[start:end_of_section]
        if begin in section and end in section:
            section = section[:section.index(begin)] + generated + \
                section[section.index(end) + len(end):]
        else:
            section = section.rstrip("\n") + f"\n\n{generated}\n\n"
        text = text[:start] + section + text[end_of_section:]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
