"""mkdocs hooks: the root's README.md, CONTRIBUTING.md and CHANGELOG.md become the site's
index.md, contributing.md and changelog.md (one copy of each, read on GitHub and on the
site alike); their links into docs/ are rewritten to the site's pages."""

import os
import re

from mkdocs.structure.files import File

ROOT_PAGES = {"README.md": "index.md", "CONTRIBUTING.md": "contributing.md",
              "CHANGELOG.md": "changelog.md"}
# a Markdown link target at the root, as GitHub resolves it
_LINK = re.compile(r"\]\((?!https?://|#)([^)\s]+)\)")


def _root(config) -> str:
  return os.path.dirname(os.path.abspath(config.config_file_path))


def on_files(files, config):
  for src, dest in ROOT_PAGES.items():
    with open(os.path.join(_root(config), src), encoding="utf-8") as f:
      files.append(File.generated(config, dest, content=f.read()))
  return files


def _site_target(target: str) -> str:
  path, _, anchor = target.partition("#")
  if path.startswith("docs/"):
    path = path[len("docs/"):]
  path = ROOT_PAGES.get(path, path)
  return path + ("#" + anchor if anchor else "")


def on_page_markdown(markdown, page, config, files):
  if page.file.src_uri in ROOT_PAGES.values():
    return _LINK.sub(lambda m: "](" + _site_target(m[1]) + ")", markdown)
  return markdown
