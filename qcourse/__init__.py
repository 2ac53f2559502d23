"""The instructor's tools behind the ``qcourse`` command: build, references, grading, sandbox, reports.

They need the ``instructor`` extra (nbgrader, jupyterlab, jupytext, nbclient, nbformat); a student
needs only ``qcore``, which imports nothing from here (docs/architecture.md).
"""
