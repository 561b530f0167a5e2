"""Bundle test fixtures live in _bundle_fixtures (importable by the tests for its helpers)."""

from _bundle_fixtures import builder_key, models, other_pki, pki  # noqa: F401
