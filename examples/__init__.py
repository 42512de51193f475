"""Small user-side examples used by the README (``gradlab check examples.losses:...``)."""
