"""Per-method parity checks, registered into ``restune.parity`` by fixture stem."""
