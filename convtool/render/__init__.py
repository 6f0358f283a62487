"""Rich tables and JSON from result objects. No computation happens here."""
