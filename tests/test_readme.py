"""The README's code blocks: every block marked runnable exits 0; every other one says why not.

Convention (in README.md): an HTML comment on the line(s) right before a fenced block,
  <!-- runnable -->              run in the default suite (must take seconds);
  <!-- runnable slow -->         run under `make test-slow`;
  <!-- not-runnable: reason -->  never run (the reason is for the reader).
Python blocks run with this interpreter, bash blocks with `bash -e` and this interpreter's
directory first on PATH (so `python` is the venv's), both from the repository root.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.M | re.S)
MARK = re.compile(r"<!--\s*(runnable(?: slow)?\s*|not-runnable:(?:(?!-->).)*)-->\s*\Z", re.S)


def blocks():
  """(language, code, mark or None, line number) of each fenced block in README.md."""
  text = open(README).read()
  out = []
  for m in FENCE.finditer(text):
    before = text[: m.start()].rstrip("\n")
    mark = MARK.search(before)
    kind = None
    if mark:
      kind = mark.group(1).split(":")[0].strip()
    out.append((m.group(1), m.group(2), kind, text[: m.start()].count("\n") + 1))
  return out


def _run(lang, code, timeout):
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  env.setdefault("JAX_PLATFORMS", "cpu")
  cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-e", "-c", code]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _params(kind):
  return [
    pytest.param(lang, code, id=f"line{line}-{lang}")
    for lang, code, k, line in blocks()
    if k == kind
  ]


def test_every_code_block_is_classified():
  found = blocks()
  assert any(k == "runnable" for _, _, k, _ in found)
  unmarked = [line for lang, _, k, line in found if lang in ("bash", "python", "sh") and not k]
  assert not unmarked, f"README blocks at lines {unmarked} need <!-- runnable --> or a reason"


def test_relative_links_exist():
  text = open(README).read()
  for target in re.findall(r"\]\(([^)#\s]+)\)", text):
    if "://" in target:
      continue
    assert os.path.exists(os.path.join(ROOT, target)), f"README links to missing {target}"


@pytest.mark.parametrize("lang,code", _params("runnable"))
def test_runnable_block(lang, code):
  proc = _run(lang, code, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("lang,code", _params("runnable slow"))
def test_runnable_slow_block(lang, code):
  proc = _run(lang, code, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
