"""What the code and the docs cite exists: every ``reports/...`` or ``bench/results/...`` file named in them is in
the repository (or is an output a dvc.yaml stage writes), every ``docs/decisions.md#anchor`` names a heading of
docs/decisions.md, and every relative link of README.md and docs/*.md leads to a file."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DECISIONS = ROOT / "docs" / "decisions.md"

# a cited results file: reports/<path>.<ext> or bench/results/<name>.json, not part of a longer path; a placeholder
# (<device>, {name}, *) stops the match before the extension, so such patterns are never taken for a file
CITED_FILE = re.compile(r"(?<![\w/.-])((?:reports|bench/results)/[\w/.+-]+\.[A-Za-z0-9]+)")
ANCHOR = re.compile(r"(?<![\w/.-])(?:docs/)?decisions\.md#([\w-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def sources() -> list[Path]:
    """The files whose citations must hold: README, docs, params, the pipeline's and the benchmarks' code."""
    files = [ROOT / name for name in ("README.md", "params.yaml", "pipeline/profiles.yaml", "bench/README.md")]
    files += sorted((ROOT / "docs").glob("*.md"))
    files += sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    return [f for f in files if f.is_file()]


def anchor_sources() -> list[Path]:
    """Everywhere a decisions entry may be cited: the sources, dvc.yaml and the tests (this file aside)."""
    tests = [f for f in sorted((ROOT / "tests").rglob("*.py")) if f.name != Path(__file__).name]
    return sources() + [f for f in (ROOT / "dvc.yaml",) if f.is_file()] + tests


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped (but - and _), spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def tracked() -> set[str] | None:
    """The files git tracks (a citation must not rest on a file only this checkout has); None outside git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    names = set(out.stdout.decode().split("\0")) - {""}
    return names or None


def stage_outputs() -> list[str]:
    """Every out, metric and plot of dvc.yaml: files the pipeline writes, cited before a run has made them."""
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8")) or {}
    entries = list(doc.get("plots") or [])
    for stage in (doc.get("stages") or {}).values():
        for key in ("outs", "metrics", "plots"):
            entries += stage.get(key) or []
    return [str(next(iter(e))) if isinstance(e, dict) else str(e) for e in entries]


def citations(pattern: re.Pattern, files: list[Path]) -> dict[str, list[str]]:
    """Each cited string -> the files (relative) that cite it."""
    found: dict[str, list[str]] = {}
    for f in files:
        for m in pattern.finditer(f.read_text(encoding="utf-8")):
            found.setdefault(m.group(1), []).append(f.relative_to(ROOT).as_posix())
    return found


def test_cited_results_files_exist():
    cited = citations(CITED_FILE, sources())
    assert "reports/ablation.md" in cited  # the scan finds what it is for
    known, outs = tracked(), stage_outputs()

    def exists(path: str) -> bool:
        if any(path == o or path.startswith(o.rstrip("/") + "/") for o in outs):
            return True  # written by a stage (reports/report.html), not committed
        return path in known if known is not None else (ROOT / path).is_file()

    missing = {path: sorted(set(where)) for path, where in cited.items() if not exists(path)}
    assert not missing, f"cited files that are not in the repository: {missing}"


@pytest.mark.parametrize("text,expected", [
    ("see `bench/results/<name>-<device>.json` and reports/figures/*.png", []),
    ("f\"bench/results/pool_study-{doc['device']}.json\"", []),
    ("(`reports/ablation.md`), .gpu/reports/x.json and bench/results/seeds-cpu.json.",
     ["reports/ablation.md", "bench/results/seeds-cpu.json"]),
    ("reports/gpu/gpu_check.md: the first run", ["reports/gpu/gpu_check.md"]),
])
def test_the_scan_skips_placeholders(text, expected):
    assert CITED_FILE.findall(text) == expected


def test_cited_decisions_name_a_heading():
    headings = {slug(line.lstrip("#")) for line in DECISIONS.read_text(encoding="utf-8").splitlines()
                if line.startswith("## ")}
    cited = citations(ANCHOR, anchor_sources())
    assert "labeler-steps" in cited and "labeler-steps" in headings
    missing = {anchor: sorted(set(where)) for anchor, where in cited.items() if anchor not in headings}
    assert not missing, f"docs/decisions.md has no heading for: {missing} (headings: {sorted(headings)})"


def test_slug_follows_github():
    assert slug("Why it's 0.25 (cpu)") == "why-its-025-cpu"
    assert slug(" labeler_steps and-more ") == "labeler_steps-and-more"


def test_relative_links_of_readme_and_docs_lead_to_files():
    broken = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(md.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0]
            if not path or re.match(r"[a-z]+:", path):
                continue  # an anchor on the same page, or a URL
            if not (md.parent / path).exists():
                broken.append(f"{md.relative_to(ROOT).as_posix()}: {target}")
    assert not broken, f"links to files that do not exist: {broken}"


def test_readme_shows_the_committed_reports_first_lines():
    """README's "Reading the report" quotes reports/report.md as committed: headline, model, findings."""
    readme = (ROOT / "README.md").read_text()
    quoted = readme.split("<!-- report-excerpt:start -->\n")[1].split("<!-- report-excerpt:end -->")[0].strip()
    report = (ROOT / "reports" / "report.md").read_text().split("\n", 2)[2]  # after the title and its blank line
    assert report.startswith(quoted + "\n"), "README's excerpt differs from reports/report.md: copy its first lines"
