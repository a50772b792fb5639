"""The README and the docs site: short front page, no dead links, no lab-notebook words, a config
page that matches the code, and a site that builds with `mkdocs build --strict`."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

# What the project says about itself: no diary of how it got here.
BANNED = {
    "the word 'session'": re.compile(r"\bsessions?\b", re.IGNORECASE),
    "an issue number": re.compile(r"\bissues?\s+#?\d+", re.IGNORECASE),
    "a bare #number": re.compile(r"(?<![\w/&#])#\d+\b"),
    "DESIGN.md": re.compile(r"DESIGN\.md"),
}
# In Python sources (code, docstrings and comments alike) only these two.
BANNED_IN_CODE = {"DESIGN.md": re.compile(r"DESIGN\.md"), "'session N'": re.compile(r"\bsession \d", re.IGNORECASE)}
SKIP_DIRS = {".venv", "tests", "site", ".git", "runs", "datasets", "logs", "__pycache__", ".pytest_cache"}


def markdown_pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where a link is only an example."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def relative_links(text: str) -> list[str]:
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose(text))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE) and not t.startswith("#")]


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; keep it at 200 or fewer (details go to docs/)"
    first_block = re.search(r"```bash\n(.*?)```", "\n".join(lines), re.DOTALL).group(1).splitlines()
    assert first_block[0].startswith("bash scripts/run.sh"), "the main job must be the first command"
    assert first_block[1].startswith("bash scripts/test.sh"), "the tests must be the second command"


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    dead = [t for t in relative_links(page.read_text(encoding="utf-8"))
            if not (page.parent / t.split("#")[0]).exists()]
    assert not dead, f"{page.relative_to(ROOT)} links to files that do not exist: {dead}"


def test_link_finder_sees_links():
    text = "see [a](docs/a.md), ![p](img.png \"t\"), [b](https://x.org/c.md), [c](#top), `[d](no.md)`"
    assert relative_links(text) == ["docs/a.md", "img.png"]


@pytest.mark.parametrize("page", [*markdown_pages(), ROOT / "bench" / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_speak_of_the_toolkit_only(page):
    text = page.read_text(encoding="utf-8")
    found = [f"{what}: {m.group(0)!r} (line {text.count(chr(10), 0, m.start()) + 1})"
             for what, pattern in BANNED.items() for m in pattern.finditer(text)]
    assert not found, f"{page.relative_to(ROOT)}: {found}"


def test_words_check_catches_them():
    samples = ["in session 3", "Sessions", "as issue 13 asks", "issues #4", "fixed #13", "see DESIGN.md"]
    for s in samples:
        assert any(p.search(s) for p in BANNED.values()), s
    for s in ["[a](#collection)", "the issue is search", "&#8594;", "##3 heading", "in 13 episodes"]:
        assert not any(p.search(s) for p in BANNED.values()), s


def code_and_config_files() -> list[Path]:
    """Every source, config and shell file of the repository (tests included, but this file)."""
    return [p for ext in ("*.py", "*.yaml", "*.sh") for p in sorted(ROOT.rglob(ext))
            if not {".venv", "site", ".git", "runs", "datasets", "logs"} & set(p.relative_to(ROOT).parts[:-1])
            and p != Path(__file__).resolve()]


def test_sources_do_not_cite_design_sessions_or_issues():
    banned = {**BANNED_IN_CODE, "an issue number": BANNED["an issue number"]}
    found = []
    for path in code_and_config_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {what}"
                  for what, pattern in banned.items() for m in pattern.finditer(text)]
    assert not found, "sources cite the lab notebook:\n" + "\n".join(found)


def test_docs_files_named_in_sources_exist():
    named = {(path, m.group(0)) for path in code_and_config_files()
             for m in re.finditer(r"docs/[\w/.-]+\.(?:md|png|json)", path.read_text(encoding="utf-8", errors="replace"))}
    missing = sorted(f"{path.relative_to(ROOT)}: {ref}" for path, ref in named if not (ROOT / ref).exists())
    assert not missing, "sources point to docs files that are not there:\n" + "\n".join(missing)


def test_docs_files_are_organised():
    loose = sorted(p.name for p in DOCS.glob("*") if p.is_file() and p.suffix != ".md")
    assert not loose, f"plots and data belong next to the page that shows them, not loose in docs/: {loose}"
    named = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*") if re.search(r"session", p.name, re.IGNORECASE))
    assert not named, f"files named after a session: {named}"
    pages = "\n".join(p.read_text(encoding="utf-8") for p in DOCS.rglob("*.md"))
    unused = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*")
                    if p.suffix in {".png", ".json", ".svg", ".jpg"} and p.name not in pages)
    assert not unused, f"data files and plots that no page shows or links: {unused}"


def test_configuration_page_is_current():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_docs.py"), "--check"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs or mkdocs-material is not installed (pip install -r requirements.txt)")
    # no -q: it lowers the log level below the warnings that --strict counts, and the build passes
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
