"""mkdocs hook: the Markdown files of docs/ join the site's pages.

mkdocs reads pages from one ``docs_dir`` and refuses the folder of its own config file, so the config
(docs/mkdocs.yml) names docs/pages/ and this hook adds docs/*.md beside them, under their own names:
docs/performance.md is the page ``performance.md``, linked as such from every other page.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

DOCS = Path(__file__).resolve().parent


def on_files(files, config):
    for path in sorted(DOCS.glob("*.md")):
        files.append(File(path.name, str(DOCS), config["site_dir"], config["use_directory_urls"]))
    return files
