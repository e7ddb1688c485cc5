"""Config fields that document themselves: each field's comment in its class body becomes its pydantic
`description`, so `foldtron config show --explain` (and the JSON schema) can print every field's meaning and
default from the schema itself, the way MaxText's commented base config reads.

The rule: a field's trailing `# comment`, prefixed by the comment block above it when that block introduces a
group (a heading such as `# Mamba-2.`, applying to every field under it until the next comment or blank line); a
block above a field without a trailing comment is that field's description. An explicit `description=` wins.
"""
from __future__ import annotations

import inspect
import io
import re
import textwrap
import tokenize
from typing import Any

_FIELD = re.compile(r"^([A-Za-z_]\w*)\s*:\s*[^=]")


def _trailing_comment(line: str) -> str:
    try:
        for tok in tokenize.generate_tokens(io.StringIO(line).readline):
            if tok.type == tokenize.COMMENT:
                return tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return ""


def comments_of(cls: type) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    heading: list[str] = []
    after_field = False
    for line in src.splitlines()[1:]:
        s = line.strip()
        if line.startswith(("    def ", "    @")) or s.startswith(("def ", "@")):
            break  # fields come before the validators
        if not s:
            heading, after_field = [], False
            continue
        if s.startswith("#"):
            if after_field:
                heading, after_field = [], False
            heading.append(s.lstrip("#").strip())
            continue
        m = _FIELD.match(s) if line.startswith("    ") and not line.startswith("     ") else None
        if m:
            doc = " ".join(x for x in (" ".join(heading), _trailing_comment(s)) if x)
            if doc:
                docs[m.group(1)] = doc
            after_field = True
    return docs


def documented(cls: type) -> type:
    """Class decorator for pydantic models: fill each field's description from its comments."""
    changed = False
    for name, doc in comments_of(cls).items():
        info = cls.model_fields.get(name)
        if info is not None and not info.description:
            info.description = doc
            changed = True
    if changed:
        cls.model_rebuild(force=True)
    return cls


def explain(model: Any, indent: int = 0) -> list[str]:
    """`key: value  # meaning (default: X)` for every field of a config instance, nested sections indented."""
    from pydantic import BaseModel

    pad = "  " * indent
    lines: list[str] = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True)) \
            if not isinstance(info.get_default(call_default_factory=True), BaseModel) else "section"
        note = (info.description or "").strip()
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:" + (f"  # {note}" if note else ""))
            lines += explain(value, indent + 1)
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            lines.append(f"{pad}{name}:" + (f"  # {note}" if note else ""))
            for item in value:
                sub = explain(item, indent + 2)
                sub[0] = "  " * (indent + 1) + "- " + sub[0].lstrip()
                lines += sub
        else:
            tail = f"  # {note} (default: {default})" if note else f"  # (default: {default})"
            lines.append(f"{pad}{name}: {value!r}{tail}")
    return lines
