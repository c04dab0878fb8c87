"""Can this prediction be trusted? A per-image guard (guard.py) and a batch shift alarm (shift.py)."""
