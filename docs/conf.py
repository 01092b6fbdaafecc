"""Sphinx configuration: MyST pages, an API reference from the docstrings (autodoc + napoleon)."""

import klagg_jax

project = "klagg_jax"
author = "klagg_jax contributors"
release = klagg_jax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: $...$ and $$...$$ math, ::: fences; headings get anchors GitHub's style ("#choosing-tau").
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# Google-style docstrings; Args / Returns / Raises as the reference's field lists.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}

html_theme = "alabaster"
html_title = f"klagg_jax {release}"
# MathJax from its CDN when online; offline the pages stay readable with the TeX source.
