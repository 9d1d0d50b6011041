"""The docs stay true: generated pages are current, every page is reachable from the README and every link lands,
the `make` targets and `anomaly` command lines they show exist and parse, and their examples run.

How the examples are run (docs/architecture.md, "Docs that run"): a ```bash or ```python block of the README or a
docs/ page is executed against the session's real Triton and a REST gateway in front of it, with `$GATEWAY`
(the gateway's base URL), `$TRITON` (Triton's gRPC address) and `$TRITON_HTTP` set, in a scratch folder holding
the repository's samples/, runpod_handler/ and test_input.json. A ```json or ```text block right after it is its
output: JSON is compared by shape (every key shown must be there; a string with `...` matches any text in its
place; a number matches any number; lists are compared on the items shown), text line by line with `...`
matching any text. A ```console block is shown, not run (a long-running server, Docker, hours of training); its
`make` targets must exist and its `anomaly` command lines must parse.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from anomaly.config import configuration_markdown
from tests.conftest import REPO

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
RUN = ("bash", "python")
OUTPUT = ("json", "text")


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    text: str
    output: Block | None = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, each runnable one with the output block right after it."""
    found, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[i])
        if not match:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        found.append(Block(page, i + 1, match.group(1), "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
        gap = i
        while gap < len(lines) and not lines[gap].strip():
            gap += 1
        if found[-1].lang in RUN and gap < len(lines) and re.match(r"^```(json|text)\s*$", lines[gap]):
            out_end = next(j for j in range(gap + 1, len(lines)) if lines[j].startswith("```"))
            found[-1].output = Block(page, gap + 1, lines[gap][3:].strip(), "\n".join(lines[gap + 1 : out_end]) + "\n")
            i = out_end + 1
    return found


def examples() -> list[Block]:
    return [b for page in PAGES for b in blocks(page) if b.lang in RUN]


# --- pages and links -------------------------------------------------------------------------------------------


def test_configuration_page_is_generated_from_the_settings():
    """docs/configuration.md is what `make docs` writes from anomaly/config.py, every knob in it."""
    assert (DOCS / "configuration.md").read_text() == configuration_markdown(), "stale: run `make docs`"


def test_every_page_is_reachable_from_the_readme_and_every_link_lands():
    readme = (REPO / "README.md").read_text()
    assert all(f"(docs/{p.name}" in readme for p in DOCS.glob("*.md")), "a docs page the README does not link"
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.relative_to(REPO)}: link to {target} lands nowhere"
            if anchor and file.suffix == ".md":
                assert anchor in anchors(file), f"{page.relative_to(REPO)}: {target}: no such heading"


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as dashes."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def test_no_history_in_the_docs():
    """Docs say what holds now: no commit hashes, no dates of past work (the measurements' tables give the date
    and commit they were taken on: docs/performance.md)."""
    for page in PAGES:
        if page.name == "performance.md":
            continue
        text = page.read_text()
        commit = re.search(
            r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b", re.sub(r"```.*?```", "", text, flags=re.S)
        )
        assert not commit, f"{page.name}: {commit.group()}"
        assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), page.name


def test_make_targets_and_anomaly_commands_the_docs_show_exist():
    from client.cli import build_parser

    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    named = set()
    for page in PAGES:  # in inline code, and at the start of a command line in a code block
        text = page.read_text()
        named |= set(re.findall(r"`make ([a-z][\w-]*)", text))
        named |= set(re.findall(r"^(?:[A-Z_]+=\S+ +)*make ([a-z][\w-]*)", text, re.M))
    assert named and named <= targets, f"the docs name missing targets {named - targets}"
    parser, checked = build_parser(), 0
    for page in PAGES:
        for block in blocks(page):
            if block.lang not in ("console", "bash"):
                continue
            for line in block.text.replace("\\\n", " ").splitlines():
                words = shlex.split(line.split(" #")[0]) if line.strip() else []
                while words and re.match(r"^[A-Z_]+=", words[0]):
                    words.pop(0)
                ends = [k for k, w in enumerate(words) if w in ("|", "||", "&&", ";") or re.match(r"^\d?[<>]", w)]
                words = words[: ends[0]] if ends else words  # the command, without its pipes and redirections
                if words and words[0] in ("anomaly", ".venv/bin/anomaly"):
                    try:
                        parser.parse_args(words[1:])
                    except SystemExit:
                        pytest.fail(f"{block.where}: `{line.strip()}` does not parse")
                    checked += 1
    assert checked >= 5


# --- examples that run -----------------------------------------------------------------------------------------


def like(text: str, shown: str) -> bool:
    """`text` is what `shown` shows, each `...` standing for any text."""
    return re.fullmatch(".*".join(re.escape(part) for part in shown.split("...")), text, re.S) is not None


def matches(shown, got, where: str) -> None:
    """`got` has the shape and the values `shown` has (module docstring)."""
    if isinstance(shown, dict):
        assert isinstance(got, dict), f"{where}: {got!r} is no object"
        for key, value in shown.items():
            assert key in got, f"{where}: no {key!r} in {sorted(got)}"
            matches(value, got[key], f"{where}.{key}")
    elif isinstance(shown, list):
        assert isinstance(got, list) and len(got) >= len(shown), f"{where}: {got!r} has fewer items than shown"
        for k, value in enumerate(shown):
            matches(value, got[k], f"{where}[{k}]")
    elif isinstance(shown, bool) or shown is None:
        assert got is shown, f"{where}: {got!r}, not {shown!r}"
    elif isinstance(shown, (int, float)):
        assert isinstance(got, (int, float)) and not isinstance(got, bool), f"{where}: {got!r} is no number"
    else:
        assert like(str(got), str(shown)), f"{where}: {got!r} is not {shown!r}"


def check_output(block: Block, stdout: str) -> None:
    shown = block.output
    if shown.lang == "json":
        matches(json.loads(shown.text), json.loads(stdout), shown.where)
        return
    got, want = stdout.rstrip("\n").splitlines(), shown.text.rstrip("\n").splitlines()
    assert len(got) == len(want), f"{shown.where}: {len(got)} lines printed, {len(want)} shown:\n{stdout}"
    for have, line in zip(got, want):
        assert like(have, line), f"{shown.where}: {have!r} is not {line!r}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder holding what the examples read from the repository; what they write stays here."""
    folder = tmp_path_factory.mktemp("docs")
    for name in ("samples", "runpod_handler", "test_input.json", ".venv"):
        (folder / name).symlink_to(REPO / name)
    return folder


@pytest.fixture(scope="module")
def endpoints(triton, tmp_path_factory):
    from tests.conftest import start_gateway

    proc, url = start_gateway(triton.grpc_url, tmp_path_factory.mktemp("gateway") / "gateway.log")
    yield {"GATEWAY": url, "TRITON": triton.grpc_url, "TRITON_HTTP": triton.http_url}
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("block", examples(), ids=lambda b: b.where)
def test_the_docs_examples_run(block, endpoints, scratch):
    env = dict(os.environ, **endpoints, TRITON_URL=endpoints["TRITON"], PYTHONPATH=str(REPO),
               PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
    command = (
        ["bash", "-euo", "pipefail", "-c", block.text] if block.lang == "bash" else [sys.executable, "-c", block.text]
    )
    done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{block.where} failed:\n{block.text}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    if block.output is not None:
        check_output(block, done.stdout)
