"""Shared pieces of the tests, imported explicitly (``from helpers.models import build``): ``models`` (small models
of every registered name, the BST config of the layer tests), ``data`` (corpora and token splits), ``training``
(a tiny training run's settings, a corpus, the CLI's one-line-error check), ``properties`` (hypothesis settings and
config strategies), ``distributed`` (a spawned FSDP worker).

pyproject.toml puts tests/ on the path; fixtures and hooks that apply to every test stay in conftest.py.
"""
