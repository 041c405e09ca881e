"""The README and docs/: every relative link and image resolves, and the two first-screen commands are what
CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_relative_link_and_image_resolves():
    checked = 0
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: {target}"
            if anchor:
                assert anchor in _anchors(dest), f"{page.name}: {target}"
            checked += 1
    assert checked > 20


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in readme, page.name


def test_first_screen_commands_are_what_ci_runs():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    assert "bash scripts/run.sh " in first_screen and "bash scripts/test.sh " in first_screen
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "bash scripts/test.sh"
    for script, command in (("run.sh", "paft run"), ("test.sh", "python -m pytest -q")):
        text = (ROOT / "scripts" / script).read_text()
        assert 'bash "$(dirname "$0")/setup.sh"' in text and command in text, script


def _leaf_keys(model, prefix: str = ""):
    """Every config key (section.key), from the pydantic models themselves."""
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_keys(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_docs_name_every_config_key():
    from paft.config import PaftConfig

    text = "\n".join(page.read_text() for page in PAGES)
    # a key is documented as `key`, `section.key` or `...key` (docs/config.md lists each section's keys on its row;
    # the pages of a topic, e.g. evaluation.md, hold the rest)
    missing = [k for k in _leaf_keys(PaftConfig) if f"`{k.rsplit('.', 1)[-1]}`" not in text
               and f"{k.rsplit('.', 1)[-1]}`" not in text and f".{k.rsplit('.', 1)[-1]} " not in text]
    assert not missing, f"no docs page names: {missing}"
