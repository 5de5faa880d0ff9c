"""requirements.lock: it pins every dependency pyproject.toml names, within its range, and the
environment the tests run in is the one it describes."""
from __future__ import annotations

import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def read_lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version.strip()
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_the_lock_pins_every_declared_dependency_within_its_range():
    pins = read_lock()
    missing = [str(r) for r in declared() if canonicalize_name(r.name) not in pins]
    assert not missing, f"not in requirements.lock (run make lock): {missing}"
    outside = [f"{r} (locked {pins[canonicalize_name(r.name)]})" for r in declared()
               if not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
    assert not outside, f"locked outside pyproject's range (run make lock): {outside}"


def installed_versions() -> dict[str, str]:
    """Name -> version of what is installed in this environment's site-packages, as pip freeze lists it.
    Not every distribution on sys.path: setuptools, once imported, puts its vendored copies (packaging,
    zipp, importlib-metadata, platformdirs) there too."""
    folders = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=folders)}


def test_the_installed_packages_are_the_locked_versions():
    import setuptools  # noqa: F401 (its vendored packages on sys.path must not count, whatever ran before)

    installed = installed_versions()
    differ = {name: (version, installed.get(name)) for name, version in read_lock().items()
              if installed.get(name) != version}
    assert not differ, f"locked vs installed (run make setup): {differ}"
