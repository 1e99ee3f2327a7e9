"""The reference pages cannot drift from the command line: every flag of `hilt <command>` is named on that
command's page in docs/, and every flag the docs (and the README) name exists. Flags are read from argparse's
actions, never from help text."""

import argparse
import ast
import re
from pathlib import Path

import pytest

from hilt.cli import COMMANDS, subcommand_parsers
from tests.conftest import REPO

DOCS = REPO / "docs"

# subcommand -> its reference page in docs/. A new subcommand adds one line here and writes its page.
PAGES = {
    "train": "training.md",
    "prepare": "data.md",
    "vocab": "data.md",
    "generate": "generation.md",
    "eval": "evaluation.md",
    "plot": "evaluation.md",
    "inspect": "evaluation.md",
    "export": "huggingface.md",
    "serve": "serving.md",
}

# flags of other programs the docs show in commands (`torchrun ... train.py`, `tensorboard --logdir runs`)
OTHER_TOOLS = {
    "torchrun": {"--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend", "--rdzv_endpoint"},
    "tensorboard": {"--logdir"},
}

FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def named_flags(path: Path) -> set[str]:
    return set(FLAG.findall(path.read_text(encoding="utf-8")))


def documented_options(action: argparse.Action) -> list[str]:
    """The spelling a page must use: the first long option (``--ilt_gate`` stands for ``--no-ilt_gate`` too)."""
    return [o for o in action.option_strings if o.startswith("--")][:1]


def script_flags(path: Path) -> set[str]:
    """The flags a benchmark script's parser declares: the string literals its ``add_argument`` calls start with
    ``--``, read from the source, so no script is imported or run."""
    calls = [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Call)]
    return {
        arg.value
        for call in calls
        if isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument"
        for arg in call.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--")
    }


def test_every_subcommand_has_a_page():
    missing = [
        f"`hilt {name}` has no reference page: write docs/{name}.md and add "
        f'"{name}": "{name}.md" to PAGES in tests/test_docs.py'
        for name in COMMANDS
        if name not in PAGES
    ]
    missing += [
        f"`hilt {name}` is documented in docs/{page}, which does not exist: write it"
        for name, page in PAGES.items()
        if name in COMMANDS and not (DOCS / page).is_file()
    ]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_is_on_its_commands_page(name):
    page = DOCS / PAGES.get(name, f"{name}.md")
    if not page.is_file():
        pytest.fail(f"`hilt {name}` has no reference page: write {page.relative_to(REPO)}")
    on_page = named_flags(page)
    parser = subcommand_parsers()[name]
    undocumented = sorted(
        flag
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for flag in documented_options(action)
        if flag not in on_page
    )
    assert not undocumented, f"flags of `hilt {name}` missing from {page.relative_to(REPO)}: {undocumented}"


def test_every_flag_the_docs_name_exists():
    known = {o for p in subcommand_parsers().values() for a in p._actions for o in a.option_strings}
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        known |= script_flags(script)
    for flags in OTHER_TOOLS.values():
        known |= flags
    pages = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
    unknown = {
        str(page.relative_to(REPO)): sorted(named_flags(page) - known)
        for page in pages
        if named_flags(page) - known
    }
    assert not unknown, f"flags named in the docs that no command has: {unknown}"


def test_the_flag_pattern_reads_markdown():
    # the two checks above rely on it: table separators and prose dashes are not flags, --no-x and --x_y are
    text = "| --- | --- |\n`--ilt_gate` / `--no-ilt_gate`, a -- b, (--top_k 40), --lr=3e-3, x--y"
    assert FLAG.findall(text) == ["--ilt_gate", "--no-ilt_gate", "--top_k", "--lr"]


LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_links_between_the_pages_resolve_inside_the_repository():
    """A clone has nothing outside the repository: every relative link in the README and docs/ (and the
    benchmarks' data notes) names a file in it, and a #fragment a heading of that page."""
    broken = []
    for page in [
        REPO / "README.md",
        *sorted(DOCS.glob("*.md")),
        *sorted((REPO / "benchmarks").glob("*/README.md")),
    ]:
        for target, anchor in LINK.findall(page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = (page.parent / target).resolve() if target else page
            if not path.is_relative_to(REPO):
                broken.append(f"{page.relative_to(REPO)}: {target} is outside the repository")
            elif not path.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} does not exist")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{page.relative_to(REPO)}: {target}#{anchor} has no such heading")
    assert not broken, "\n".join(broken)


def test_no_page_points_outside_the_repository():
    """Paths in code spans and commands too: a clone has no ../shared and no development machine's /work."""
    pages = [REPO / "README.md", *DOCS.glob("*.md"), *(REPO / "benchmarks").rglob("*.py"),
             *(REPO / "benchmarks").glob("*/README.md")]  # fmt: skip
    outside = [
        f"{page.relative_to(REPO)}:{n}: {line.strip()[:100]}"
        for page in sorted(pages)
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\.\./shared\b|(?<![\w.])/work/", line)
    ]
    assert not outside, "\n".join(outside)


def test_the_link_check_reads_markdown():
    text = "[a](docs/x.md), [b](x.md#two-words), [c](#local), ![img](../p.png), [web](https://e.org/a#b)"
    assert LINK.findall(text) == [
        ("docs/x.md", ""),
        ("x.md", "two-words"),
        ("", "local"),
        ("../p.png", ""),
        ("https://e.org/a", "b"),
    ]


# The docs say what is true now; how a figure came about lives in git history and the dated results files.
HISTORY = re.compile(r"\bsessions?\b|\bissues? ?#?\d", re.IGNORECASE)


def test_no_page_speaks_of_sessions_or_issue_numbers():
    texts = [REPO / "README.md", *DOCS.glob("*.md")]
    for folder in ("benchmarks", "src"):
        texts += [p for p in (REPO / folder).rglob("*") if p.suffix in (".md", ".py", ".txt", ".js", ".html")]
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()[:100]}"
        for path in sorted(texts)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if HISTORY.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_history_pattern_spares_other_words():
    assert (
        HISTORY.search("in a later session")
        and HISTORY.search("Issue 20's target")
        and HISTORY.search("issue #7")
    )
    assert not HISTORY.search("sessionStorage.getItem") and not HISTORY.search("the issues it raised")
