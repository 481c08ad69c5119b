"""Shared by the foreign-suite runners: a package's source distribution, and JUnit counts."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET


def download(package: str, version: str, workdir: pathlib.Path) -> pathlib.Path:
    """Download and unpack the sdist of ``package==version``; its tests are not in the wheel
    (nothing is copied into this repository). Returns the unpacked folder."""
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "-q", "--no-deps"),
            *("--no-binary", ":all:", "-d", str(workdir), f"{package}=={version}"),
        ],
        check=True,
    )
    stem = package.replace("-", "_").lower()
    archive = next(path for path in workdir.glob("*.tar.gz") if path.name.lower().startswith(stem))
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / archive.name.removesuffix(".tar.gz")


def failures(report: pathlib.Path) -> tuple[int, set[str]]:
    """Tests run and the ids of those that failed or errored, from a JUnit XML report."""
    cases = list(ET.parse(report).getroot().iter("testcase"))
    failed = {
        f"{case.get('classname')}::{case.get('name')}"
        for case in cases
        if case.find("failure") is not None or case.find("error") is not None
    }
    ran = sum(1 for case in cases if case.find("skipped") is None)
    return ran, failed
