"""Every code block of README.md and docs/*.md runs in CI, so the documentation cannot drift from the
code.

- ```python blocks are executed: each file's blocks in order, in one namespace of their own (all
  files in one child process, so that torch is imported once), under a time limit. A block that
  starts with ``>>>`` is a doctest, its printed output checked. The legacy implicit-dim warning of
  softmax(dim=None) is an error there: examples pass ``dim``.
- ```bash / ```sh blocks install and build, so they cannot run here. ``bash -n`` parses them, every
  repository path they name must exist, every ``python -m`` module must import, and a release
  sdist they name must carry the current version.
- ```text blocks (output, diagrams, formulas) are not run. Any other fence (or none) fails.
- The examples the docs point to (``examples/*.py``) run with small arguments, and what they print
  is checked.
- Repository paths in inline code and in text blocks (`tests/...`, `csrc/...`, ...) exist, relative links and their
  #anchors resolve, and README links every page of docs/.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import online_softmax

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
DOC_IDS = [str(p.relative_to(ROOT)) for p in DOC_FILES]
LANGUAGES = {"python", "bash", "sh", "text"}
# Top-level entries of the repository that inline code and shell blocks refer to by path.
REPO_PREFIXES = ("csrc/", "tests/", "scripts/", "examples/", "benchmarks/", "online_softmax/", "docs/", ".ci/")
TIME_LIMIT_S = 300  # all python blocks of all files together; they take ~20 s on 2 cores

# The examples the docs name, each with small arguments, and a line its output must contain.
EXAMPLES = {
    "examples/distributed_softmax.py": (["--world", "2", "--rows", "8", "--vocab", "1000"],
                                        "softmax slice matches the single-process op: True; logsumexp matches: True"),
    "examples/beam_search_gpt2.py": (["--vocab", "1000", "--new-tokens", "4", "--beams", "2", "--device", "cpu"],
                                     "same sequences as transformers.generate: True"),
}


def code_blocks(path):
    """[(language, first code line (1-based), code)] of the fenced blocks of a markdown file."""
    blocks, lang, start, body = [], None, 0, []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if lang is None:
            m = re.match(r"^(\s*)```(.*)$", line)
            if m:
                assert not m.group(1), f"{path.name}:{n}: an indented fence (write fences at column 0)"
                lang, start, body = m.group(2).strip(), n + 1, []
        elif line.startswith("```"):
            assert line.strip() == "```", f"{path.name}:{n}: a fence closes with ``` alone"
            blocks.append((lang, start, "\n".join(body) + "\n"))
            lang = None
        else:
            body.append(line)
    assert lang is None, f"{path.name}:{start - 1}: a fence that is never closed"
    return blocks


def prose(path):
    """The text of a markdown file outside its fenced blocks."""
    return re.sub(r"^```.*?^```[ \t]*$", "", path.read_text(), flags=re.S | re.M)


# Runs in the child: each file's python blocks in order, in a fresh namespace; one JSON result per file.
RUNNER = textwrap.dedent(r"""
    import doctest, json, sys, time, traceback, warnings
    warnings.filterwarnings("error", message="Implicit dimension choice")
    files, out = json.load(open(sys.argv[1])), sys.argv[2]
    results = {}
    for name, blocks in files.items():
        ns, t0 = {"__name__": "__doc_example__"}, time.perf_counter()
        try:
            for line, code in blocks:
                if code.lstrip().startswith(">>>"):
                    test = doctest.DocTestParser().get_doctest(code, ns, f"{name}:{line}", name, line - 1)
                    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
                    report = []
                    runner.run(test, out=report.append, clear_globs=False)
                    if runner.failures:
                        raise AssertionError("".join(report))
                else:  # padded so that tracebacks give the markdown file's own line numbers
                    exec(compile("\n" * (line - 1) + code, name, "exec"), ns)
            results[name] = {"ok": True}
        except BaseException:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        json.dump(results, open(out, "w"))
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the docs' python blocks (one child) and the examples (one child each) side by side,
    then waits for all of them: {doc file: result} and {example: CompletedProcess-like dict}."""
    tmp = tmp_path_factory.mktemp("docs")
    files = {}
    for path, name in zip(DOC_FILES, DOC_IDS):
        blocks = [(line, code) for lang, line, code in code_blocks(path) if lang == "python"]
        if blocks:
            files[str(path)] = blocks
    (tmp / "blocks.json").write_text(json.dumps(files))
    (tmp / "runner.py").write_text(RUNNER)
    env = dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning", TOKENIZERS_PARALLELISM="false")
    procs = {"docs": subprocess.Popen([sys.executable, str(tmp / "runner.py"), str(tmp / "blocks.json"),
                                       str(tmp / "results.json")], cwd=tmp, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)}
    for example, (args, _) in EXAMPLES.items():
        procs[example] = subprocess.Popen([sys.executable, str(ROOT / example), *args], cwd=tmp, env=env,
                                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    outputs = {}
    for key, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=TIME_LIMIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0] + f"\n[killed after {TIME_LIMIT_S} s]"
        outputs[key] = {"returncode": proc.returncode, "output": out}
    results_file = tmp / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    return {"files": files, "results": results, "outputs": outputs}


@pytest.mark.parametrize("path", DOC_FILES, ids=DOC_IDS)
def test_every_block_is_fenced_with_a_known_language(path):
    for lang, line, _ in code_blocks(path):
        assert lang in LANGUAGES, (f"{path.name}:{line - 1}: fence ```{lang}: use python (run in CI), bash/sh "
                                   f"(checked), or text (not run)")


@pytest.mark.parametrize("path", DOC_FILES, ids=DOC_IDS)
def test_python_blocks_run(path, runs):
    if str(path) not in runs["files"]:
        assert not any(lang == "python" for lang, _, _ in code_blocks(path))
        return
    if any(re.search(r"^\s*import transformers|[ ,]transformers[ ,\n]", code)
           for _, code in runs["files"][str(path)]):
        pytest.importorskip("transformers", reason="the decoding examples compare against transformers "
                                                   "(scripts/install.sh installs it)")
    result = runs["results"].get(str(path))
    assert result is not None, f"the runner never reached {path.name}:\n{runs['outputs']['docs']['output'][-5000:]}"
    assert result["ok"], f"a python block of {path.name} failed:\n{result['error']}"


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_examples_the_docs_name_run(example, runs):
    if "transformers" in (ROOT / example).read_text():
        pytest.importorskip("transformers", reason=f"{example} compares against transformers "
                                                   "(scripts/install.sh installs it)")
    run = runs["outputs"][example]
    assert run["returncode"] == 0, f"{example} failed:\n{run['output'][-5000:]}"
    assert EXAMPLES[example][1] in run["output"], run["output"][-5000:]


def test_every_example_the_docs_name_is_run():
    named = set()
    for path in DOC_FILES:
        named |= set(re.findall(r"\bexamples/[\w./-]+\.py", path.read_text()))
    assert named <= set(EXAMPLES), f"add a small run of {sorted(named - set(EXAMPLES))} to EXAMPLES"


def _shell_words(code):
    for line in code.splitlines():
        try:
            yield from shlex.split(line, comments=True)
        except ValueError:
            continue  # bash -n judges the syntax


@pytest.mark.parametrize("path", DOC_FILES, ids=DOC_IDS)
def test_shell_blocks_parse_and_name_what_exists(path):
    import importlib.util

    for lang, line, code in code_blocks(path):
        if lang not in ("bash", "sh"):
            continue
        where = f"{path.name}:{line}"
        parse = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
        assert parse.returncode == 0, f"{where}: bash -n: {parse.stderr}"
        words = list(_shell_words(code))
        for i, word in enumerate(words):
            if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", word) or word.startswith("-") or "://" in word:
                continue  # an environment assignment, an option, a URL
            if word.startswith(REPO_PREFIXES) or word.endswith((".sh", ".py")):
                assert (ROOT / word).exists(), f"{where}: {word} does not exist in the repository"
            sdist = re.fullmatch(r"online_softmax-(.+)\.tar\.gz", word)
            if sdist:
                assert sdist.group(1) == online_softmax.__version__, f"{where}: {word} is not version " \
                                                                     f"{online_softmax.__version__}"
            if word == "-m" and i > 0 and words[i - 1].startswith("python") and i + 1 < len(words):
                module = words[i + 1]
                if module not in ("pip", "pytest", "build"):
                    assert importlib.util.find_spec(module), f"{where}: python -m {module}: no such module"


def _named_paths(path):
    """Repository paths in inline code and in ```text blocks (layouts, diagrams)."""
    spans = re.findall(r"`([^`\n]+)`", prose(path))
    spans += [code for lang, _, code in code_blocks(path) if lang == "text"]
    for span in spans:
        for word in span.split():
            word = word.rstrip(".,;:)")
            if word.startswith(REPO_PREFIXES):
                yield word


def _expand(word):
    """`a.{x,y}` -> a.x, a.y; a `*` is a glob."""
    m = re.search(r"\{([^}]*)\}", word)
    if m:
        return [w for alt in m.group(1).split(",") for w in _expand(word[:m.start()] + alt + word[m.end():])]
    return [word]


@pytest.mark.parametrize("path", DOC_FILES, ids=DOC_IDS)
def test_named_paths_exist(path):
    missing = []
    for word in _named_paths(path):
        for candidate in _expand(word):
            exists = any(ROOT.glob(candidate)) if "*" in candidate else (ROOT / candidate).exists()
            if not exists:
                missing.append(candidate)
    assert not missing, f"{path.name} names paths that do not exist: {missing}"


def _anchors(path):
    """GitHub's heading anchors of a markdown file."""
    seen, anchors = {}, set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", prose(path), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("path", DOC_FILES, ids=DOC_IDS)
def test_links_resolve(path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(path)):
        if re.match(r"^[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{path.name}: broken links {broken}"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in DOC_FILES[1:] if f"](docs/{p.name})" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_docs_speak_of_the_project_only():
    """Limitations are facts about the code ("never run on a GPU"), not about who worked on it."""
    pattern = re.compile(r"\bissue[- ]\d+|\bthe review\b|\bthis session\b|\bno session\b", re.I)
    hits = [f"{p.name}: {m.group(0)}" for p in DOC_FILES for m in pattern.finditer(p.read_text())]
    assert not hits, hits
