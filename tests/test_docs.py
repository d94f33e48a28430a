"""The docs: the configuration reference equals the code, the README stays short and its
example is on the building page, measurements name their machine, and the site builds with
`mkdocs build --strict` and renders in headless Chromium (pages, API, images, links)."""

import html
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from helpers.browser import chromium

from bcdnet_jax.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BUILDING = ROOT / "docs" / "building-bnns.md"


def _config_reference():
  spec = importlib.util.spec_from_file_location(
      "config_reference", ROOT / "scripts" / "config_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_reference_is_the_code():
  ref = _config_reference()
  page = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
  assert ref.render(page) == page, "docs/training.md is stale: python scripts/config_reference.py"
  for key in config_lib.FIELDS:
    assert f"| `{key}` | " in page, key
  # the check can fail: a changed default or a missing row is put back
  stale = page.replace("| `keep_checkpoints` | `3` |", "| `keep_checkpoints` | `5` |")
  assert stale != page and ref.render(stale) == page
  assert ref.main(["--check"]) == 0


def readme_example() -> str:
  """The Python block of the README's "Build your own binary network" section."""
  text = README.read_text(encoding="utf-8")
  section = text.split("## Build your own binary network", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 1, blocks
  return blocks[0]


def test_readme_is_short_and_its_example_is_on_the_building_page():
  assert len(README.read_text(encoding="utf-8").splitlines()) <= 220
  assert BUILDING.is_file(), f"{BUILDING} is missing (the guide of bcdnet_jax.nn)"
  assert readme_example().strip() in BUILDING.read_text(encoding="utf-8")


def test_measurements_name_their_machine():
  pages = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
  for page in pages:
    text = " ".join(page.read_text(encoding="utf-8").split())
    found = re.findall(r"\b(?:this|our) (?:machine|CPU|computer|box|GPU)\b", text, re.I)
    assert not found, (page.name, found)


# --- the built site ---------------------------------------------------------------------

def build_site(out: pathlib.Path) -> pathlib.Path:
  pytest.importorskip("mkdocs", reason='the docs extra: pip install -e ".[docs]"')
  r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                      str(ROOT / "mkdocs.yml"), "-d", str(out)],
                     capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
  assert r.returncode == 0, r.stderr[-4000:]
  return out


_REF = re.compile(r'\s(?:href|src)="([^"]+)"')


def broken_links(site: pathlib.Path) -> list[str]:
  """'page -> target' for every relative href/src of every built page whose file, or
  whose #anchor in it, does not exist."""
  ids = {}
  bad = []
  for page in sorted(site.rglob("*.html")):
    if page.name == "404.html":
      continue  # served by a web server for any missing path: its links are absolute
    for target in _REF.findall(page.read_text(encoding="utf-8")):
      target = html.unescape(target)
      if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
        continue  # http(s):, mailto:, data: ... are not the site's
      path, _, anchor = target.partition("#")
      dest = (page.parent / path).resolve() if path else page
      if dest.is_dir():
        dest = dest / "index.html"
      if not dest.is_file():
        bad.append(f"{page.relative_to(site)} -> {target}")
      elif anchor and dest.suffix == ".html":
        if dest not in ids:
          ids[dest] = set(re.findall(r'\sid="([^"]+)"', dest.read_text(encoding="utf-8")))
        if anchor not in ids[dest]:
          bad.append(f"{page.relative_to(site)} -> {target}")
  return bad


_PROBE = """<script>window.addEventListener('load', function () {
  var r = {title: document.title, h1: [], code: [], images: []};
  document.querySelectorAll('article h1').forEach(function (h) { r.h1.push(h.textContent); });
  document.querySelectorAll('pre code').forEach(function (c) { r.code.push(c.textContent); });
  document.querySelectorAll('img').forEach(function (i) {
    r.images.push({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0});
  });
  r.headings = Array.from(document.querySelectorAll('.doc-heading'))
      .map(function (h) { return h.id; });
  var p = document.createElement('pre'); p.id = 'site-check';
  p.textContent = JSON.stringify(r); document.body.appendChild(p);
});</script>"""


def rendered(page: pathlib.Path) -> dict:
  """What headless Chromium shows of `page` once loaded: title, h1s, code blocks, images
  ({src, ok}) and the ids of the API reference's headings."""
  probe = page.with_name("_probe_" + page.name)  # beside it: the same relative links
  probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"),
                   encoding="utf-8")
  try:
    dom = subprocess.run(chromium() + ["--virtual-time-budget=10000", "--dump-dom",
                                        probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
  finally:
    probe.unlink()
  m = re.search(r'<pre id="site-check">(.*?)</pre>', dom, re.S)
  assert m, dom[-2000:]
  return json.loads(html.unescape(m[1]))


@pytest.mark.slow
def test_site_builds_and_renders_in_headless_chromium(tmp_path):
  chromium()  # before the build: without a browser there is nothing to check
  site = build_site(tmp_path / "site")
  assert broken_links(site) == []

  index = rendered(site / "index.html")
  assert [h.rstrip("¶") for h in index["h1"]] == ["bcdnet-jax"] and "bcdnet-jax" in index["title"]
  example = readme_example().strip()
  assert any(c.strip() == example for c in index["code"])

  api = rendered(site / "api" / "nn.html")
  for name in ("bcdnet_jax.nn.models.create_model", "bcdnet_jax.nn.models.ModelSpec",
               "bcdnet_jax.nn.quantizers"):
    assert name in api["headings"], (name, api["headings"][:20])
  loader = rendered(site / "api" / "deploy.html")
  assert "bcdnet_jax.deploy.packed.load_packed" in loader["headings"]

  building = rendered(site / "building-bnns.html")
  assert any(c.strip() == example for c in building["code"]), "the README's example"

  images = []  # every page whose HTML has an image (or a tag the browser makes one of)
  for page in sorted(p for p in site.rglob("*.html") if p.name != "404.html"):
    if re.search(r"<im(?:g|age)\b", page.read_text(encoding="utf-8")):
      images += [dict(i, page=page.name) for i in rendered(page)["images"]]
  assert any(i["src"] == "digits_flip_ratio.png" for i in images)
  assert [i for i in images if not i["ok"]] == []

  # the checks can fail: a missing image is reported by both
  (site / "digits_flip_ratio.png").unlink()
  assert broken_links(site) == ["diagnostics.html -> digits_flip_ratio.png"]
  assert [i["src"] for i in rendered(site / "diagnostics.html")["images"]
          if not i["ok"]] == ["digits_flip_ratio.png"]
