"""Instructor tooling behind the ``qcourse`` command."""
