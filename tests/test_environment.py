"""The pins: one lock, mirrored for conda, installed as written."""
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def lock_pins() -> list[str]:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_every_lock_line_is_an_exact_pin():
    for pin in lock_pins():
        req = Requirement(pin)
        (spec,) = req.specifier
        assert spec.operator == "==", pin


def test_torch_is_pinned_to_the_cpu_friendly_release():
    assert "torch==2.13.0" in lock_pins()


def test_environment_yml_equals_the_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    (pip_section,) = [d for d in env["dependencies"] if isinstance(d, dict)]
    pins = [p for p in pip_section["pip"] if not p.startswith("-e")]
    assert sorted(pins) == sorted(lock_pins())


def test_installed_versions_match_the_lock():
    for pin in lock_pins():
        req = Requirement(pin)
        installed = metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} vs {pin}"
