"""Every ```python block of README.md and docs/*.md runs (the docs are executed).

All blocks of one file run in order in one namespace, so later blocks may use names from
earlier ones; one test case per file. Blocks fenced as anything else (```bash, ```text,
```console) are not run. A failure names the file, the block number and its first line; a
block that imports a missing optional extra (torch, scikit-learn, ...) skips the file.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL_DEPENDENCIES = frozenset(
    {
        "torch",
        "sklearn",
        "matplotlib",
        "tqdm",
        "mnist1d",
        "lightning",
        "pytorch_lightning",
        "dask",
        "distributed",
    }
)
"""Extras (pyproject.toml): a block that needs a missing one is skipped, not failed."""
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def markdown_files() -> list[Path]:
    """README.md and docs/*.md (recursively), as they exist when the tests are collected."""
    files = [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []
    files += sorted((ROOT / "docs").rglob("*.md")) if (ROOT / "docs").is_dir() else []
    return files


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every block fenced as ```python, in order."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        words = opening["info"].split()
        language = words[0].lower() if words else ""
        start = i + 1
        i = start
        body = []
        while i < len(lines):
            closing = FENCE.match(lines[i])
            if closing and closing["fence"].startswith(fence) and not closing["info"].strip():
                break
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        if language == "python":
            blocks.append((start + 1, "\n".join(body) + "\n"))
    return blocks


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", markdown_files(), ids=doc_id)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{doc_id(path)} has no python blocks")
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    run_blocks(doc_id(path), blocks)


def run_blocks(name: str, blocks: list[tuple[int, str]]) -> dict[str, object]:
    """Run ``blocks`` in order in one namespace; fail naming the file and the block."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    for number, (line, code) in enumerate(blocks, start=1):
        where = f"{name}, python block {number} of {len(blocks)} (line {line})"
        try:
            exec(compile(code, f"<{where}>", "exec"), namespace)
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] not in OPTIONAL_DEPENDENCIES:
                pytest.fail(f"{where} failed:\n{code}\n{traceback.format_exc()}", pytrace=False)
            pytest.skip(f"{where} needs the optional dependency {error.name!r}")
        except Exception:
            pytest.fail(f"{where} failed:\n{code}\n{traceback.format_exc()}", pytrace=False)
    return namespace


def test_block_parser():
    text = (
        "intro\n```python\na = 1\n```\n```bash\nexit 1\n```\n"
        "- item\n\n  ```python title=x\n  b = a + 1\n  ```\n```text\nb = 0\n```\n"
        "````python\nc = '```'\n````\n```\nplain\n```\n```py\nnot run\n```\n"
    )
    blocks = python_blocks(text)
    assert [code for _, code in blocks] == ["a = 1\n", "b = a + 1\n", "c = '```'\n"]
    assert [line for line, _ in blocks] == [3, 11, 17]


def test_blocks_share_one_namespace_and_failures_name_the_block():
    blocks = python_blocks("```python\nx = 2\n```\ntext\n```python\ny = x * 3\n```\n")
    assert run_blocks("GOOD.md", blocks)["y"] == 6
    broken = python_blocks("```python\nx = 1\n```\n\n```python\n1 / 0\n```\n")
    with pytest.raises(pytest.fail.Exception) as info:
        run_blocks("BROKEN.md", broken)
    message = str(info.value)
    assert "BROKEN.md, python block 2 of 2 (line 6)" in message
    assert "ZeroDivisionError" in message
