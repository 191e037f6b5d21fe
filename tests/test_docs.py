"""The documentation: its code runs, and its API reference and error guide are complete.

Every ```python block of every page (``docs/**/*.md`` and ``README.md``) runs: the
blocks of a page in order, in one fresh namespace, in a temporary working directory.
A block is skipped only when the line right above its fence is ``<!-- skip -->``
(for code that cannot run here, such as multi-host setup); use that sparingly. Fences
must name a language, so no Python escapes by being untagged. The strict docs build
(``mkdocs build --strict`` in ``.ci/run``) checks links and rendering.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import textwrap

import pytest

import nnx_peft

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]
LANGUAGES = {"python", "bash", "text"}
SKIP_MARKER = "<!-- skip -->"
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\S*)\s*$")


@dataclasses.dataclass(frozen=True)
class CodeBlock:
    """One fenced code block of a page."""

    page: pathlib.Path
    line: int  # 1-based line of the first line of code
    lang: str
    code: str
    skipped: bool


def code_blocks(page: pathlib.Path) -> list[CodeBlock]:
    """The fenced code blocks of ``page``, in order."""
    blocks: list[CodeBlock] = []
    lines = page.read_text().splitlines()
    previous, index = "", 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            previous = lines[index].strip() or previous
            index += 1
            continue
        end = next(
            (j for j in range(index + 1, len(lines)) if lines[j].strip() == "```"), len(lines)
        )
        assert end < len(lines), f"{page.name}:{index + 1}: code block is never closed"
        blocks.append(
            CodeBlock(
                page=page,
                line=index + 2,
                lang=opening["lang"],
                code=textwrap.dedent("\n".join(lines[index + 1 : end])),
                skipped=previous == SKIP_MARKER,
            )
        )
        previous, index = "", end + 1
    return blocks


def page_id(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_code_blocks_name_a_known_language(page: pathlib.Path) -> None:
    for block in code_blocks(page):
        assert block.lang in LANGUAGES, (
            f"{page_id(page)}:{block.line - 1}: fence language {block.lang!r}; use one of "
            f"{sorted(LANGUAGES)} (python blocks run in tests/test_docs.py)"
        )


PYTHON_PAGES = [page for page in PAGES if any(b.lang == "python" for b in code_blocks(page))]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=page_id)
def test_python_blocks_run(
    page: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # files a page writes land in a temporary directory
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in code_blocks(page):
        if block.lang != "python" or block.skipped:
            continue
        # Padding with newlines makes tracebacks show the line numbers of the page.
        code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        exec(code, namespace)


def documented_names() -> set[str]:
    """Every ``::: name`` of the API reference pages."""
    directive = re.compile(r"^:::\s*(\S+)", re.MULTILINE)
    return {
        name for page in (DOCS / "api").glob("*.md") for name in directive.findall(page.read_text())
    }


def test_api_reference_documents_every_public_name() -> None:
    documented = documented_names()
    missing = sorted({f"nnx_peft.{name}" for name in nnx_peft.__all__} - documented)
    assert not missing, f"add `::: <name>` to a page under docs/api/ for: {missing}"
    assert "nnx_peft.toy" in documented


def test_api_reference_names_exist() -> None:
    stale = [
        name
        for name in documented_names()
        if name != "nnx_peft.toy" and name.removeprefix("nnx_peft.") not in nnx_peft.__all__
    ]
    assert not stale, f"docs/api/ documents names that nnx_peft does not export: {stale}"


def test_troubleshooting_covers_every_error() -> None:
    page = (DOCS / "troubleshooting.md").read_text()
    errors = [
        name
        for name in nnx_peft.__all__
        if isinstance(getattr(nnx_peft, name), type)
        and issubclass(getattr(nnx_peft, name), nnx_peft.PeftError)
        and name != "PeftError"
    ]
    missing = [name for name in errors if f"`{name}`" not in page]
    assert not missing, f"docs/troubleshooting.md does not explain: {missing}"
