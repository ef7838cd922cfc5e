"""What a user installs: light dependencies (triton optional), license, changelog, type marker,
and a README that quotes BENCHMARKS.md's figures instead of its own (issue 16)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_triton_is_an_optional_extra():
    deps = PYPROJECT["project"]["dependencies"]
    assert not any(d.lower().startswith("triton") for d in deps), deps
    extra = PYPROJECT["project"]["optional-dependencies"]["triton"]
    assert any(d.startswith("triton>=") for d in extra), extra


def test_license_changelog_and_type_marker():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"  # PEP 639 SPDX expression
    assert project["license-files"] == ["LICENSE"]
    requires = PYPROJECT["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77
               for r in requires), requires  # PEP 639 needs setuptools >= 77
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")
    assert (ROOT / "hf_compressed_optim" / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["hf_compressed_optim"]


def test_native_source_ships_with_the_package():
    """The native kernels are built from their C source on first use: it must be in the wheel."""
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["hf_compressed_optim.kernels"]
    assert "csrc/*.c" in data
    assert list((ROOT / "hf_compressed_optim" / "kernels" / "csrc").glob("*.c"))


def _figures(text: str) -> list[str]:
    """Ratios of BENCHMARKS.md: numbers followed by x / ×, and table cells (``| 6.73 (...) |``)."""
    return (re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)\s?[x×](?!\w)", text)
            + re.findall(r"\|\s*(\d+(?:\.\d+)?)\s*(?=[|(])", text))


def test_readme_ratios_are_benchmarks_figures():
    """Every "N×" figure of the README's summaries (which optimizer, Performance) is a figure of
    BENCHMARKS.md, rounded: the README quotes, BENCHMARKS.md holds the numbers."""
    readme = (ROOT / "README.md").read_text()
    bench = set(_figures((ROOT / "BENCHMARKS.md").read_text()))
    sections = [readme[readme.index("## Which optimizer should I use?"):
                       readme.index("## MicroAdam in one paragraph")],
                readme[readme.index("## Performance"):readme.index("## Development")]]
    missing = []
    for section in sections:
        for fig in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)\s?×", section):
            places = len(fig.split(".")[1]) if "." in fig else 0
            if not any(abs(round(float(b), places) - float(fig)) < 1e-9 for b in bench):
                missing.append(fig)
    assert not missing, missing
