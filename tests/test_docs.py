"""The README and docs/ pages: every relative link reaches a file, and an anchor a heading."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: pathlib.Path) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
  headings = re.findall(r"^#+\s+(.*)$", page.read_text(), flags=re.MULTILINE)
  return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_resolve():
  broken, checked = [], 0
  for page in PAGES:
    for target in LINK.findall(page.read_text()):
      if re.match(r"[a-z]+:", target):
        continue  # http(s), mailto: not checked offline
      path, _, anchor = target.partition("#")
      linked = (page.parent / path).resolve() if path else page
      checked += 1
      if not linked.exists():
        broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
      elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
        broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
  assert checked > 30 and not broken, broken


def test_readme_stays_short_and_links_every_page():
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 220
  for page in PAGES[1:]:
    assert f"docs/{page.name}" in readme, f"README does not link docs/{page.name}"
