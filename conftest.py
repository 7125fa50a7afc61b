"""pytest: the repository root holds the modules (flat layout); this file puts it on sys.path for bare `pytest`."""
