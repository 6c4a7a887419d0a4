"""pyproject.toml and requirements.txt name the same runtime dependencies."""

import os
import re
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In requirements.txt (the README's one install) but not runtime needs: the tests and the
# notebook runner they execute notebooks/ with.
DEV_ONLY = {"pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel"}


def requirement_lines(path):
  with open(path) as f:
    return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def name(requirement: str) -> str:
  return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_pyproject_dependencies_are_requirements_txt_without_dev_tools():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  requirements = requirement_lines(os.path.join(REPO, "requirements.txt"))
  runtime = sorted(r for r in requirements if name(r) not in DEV_ONLY)
  assert sorted(project["dependencies"]) == runtime
  dev = {name(r) for r in project["optional-dependencies"]["dev"]}
  assert DEV_ONLY <= dev
  assert project["requires-python"] == ">=3.10"
