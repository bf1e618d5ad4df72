"""Support code of torroute's own tests (not fixtures: those are tests/fixtures_*.py and the
torroute.testing pytest plugin).  Import as ``from support.postfix import PostfixInstance``."""
