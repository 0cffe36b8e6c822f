"""The book as a reader meets it: complete, and rendered offline in a real browser.

Two checks beyond the strict build in ``test_docs.py``:

- every public function and class in ``src/`` and every kernel in ``csrc/`` appears in some page,
  embedded by a snippet section or a mkdocstrings ``:::`` reference, so no component goes unexplained;
- every page, served from localhost, opens in headless Chromium with no request leaving localhost, no
  console error, math rendered as MathML (no raw TeX left) and every figure loaded. A screenshot of
  each page goes to a folder that the test run prints at the end.
"""

import ast
import functools
import http.server
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO

SNIPPET = re.compile(r'--8<--\s+"([^":]+)(?::([\w-]+))?"')
MKDOCSTRINGS = re.compile(r"^:::\s+([\w.]+)", re.M)
# Kernels: CUDA __global__ functions, and the per-row C++ kernels and the entry points registered
# with the dispatcher.
CUDA_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)")
CPU_KERNEL = re.compile(r"^\w[\w:<>, ]*\s+(\w+_rows?)\(", re.M)
REGISTERED = re.compile(r"m\.impl\(\s*\"\w+\",\s*&?(\w+)")


def snippet_section(path: Path, section: str | None) -> str:
    text = path.read_text()
    if section is None:
        return text
    start = re.search(rf"--8<-- \[start:{re.escape(section)}\]", text)
    end = re.search(rf"--8<-- \[end:{re.escape(section)}\]", text)
    assert start and end, f"{path}:{section} is referenced but not defined"
    return text[start.end() : end.start()]


def embedded_text_and_objects() -> tuple[str, set[str]]:
    """All source text the pages embed, and the dotted names they document with mkdocstrings."""
    embedded, documented = [], set()
    for page in (REPO / "docs").rglob("*.md"):
        text = page.read_text()
        for path, section in SNIPPET.findall(text):
            embedded.append(snippet_section(REPO / path, section or None))
        documented.update(MKDOCSTRINGS.findall(text))
    return "\n".join(embedded), documented


def public_python_names() -> list[str]:
    names = []
    for module in sorted((REPO / "src").glob("*.py")):
        tree = ast.parse(module.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                names.append(f"src.{module.stem}.{node.name}")
    return names


def kernel_names() -> list[str]:
    names = []
    for source in sorted((REPO / "csrc").glob("*")):
        text = source.read_text()
        found = set(CUDA_KERNEL.findall(text)) | set(REGISTERED.findall(text))
        if source.suffix == ".cpp":
            found |= set(CPU_KERNEL.findall(text))
        names += [f"{source.name}:{name}" for name in sorted(found)]
    return names


def test_every_public_name_and_kernel_is_in_the_book():
    embedded, documented = embedded_text_and_objects()
    missing = []
    for dotted in public_python_names():
        name = dotted.rsplit(".", 1)[1]
        defined_in_embed = re.search(rf"^\s*(?:def|class)\s+{name}\b", embedded, re.M)
        documented_here = any(dotted == d or dotted.startswith(d + ".") for d in documented)
        if not (defined_in_embed or documented_here):
            missing.append(dotted)
    for kernel in kernel_names():
        name = kernel.split(":")[1]
        if not re.search(rf"\b{name}\s*\(", embedded):
            missing.append(kernel)
    assert not missing, f"not embedded in any page of docs/: {missing}"


def test_the_kernel_finder_finds_kernels():
    # The check above is only as good as its finder: it must see the kernels that exist.
    kernels = kernel_names()
    assert any(k.startswith("fused_softmax_cuda.cu:") for k in kernels)
    assert any(k.startswith("fused_softmax.cpp:") for k in kernels)


# ---------------------------------------------------------------------------------------------
# The browser test

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO / ".cache" / "book-screenshots"


@pytest.fixture(scope="module")
def served_book(built_book):
    if CHROMIUM is None:
        pytest.skip(
            "headless Chromium is not installed (Debian package 'chromium'; .ci/run installs it)"
        )
    site = built_book
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield site, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.slow
def test_every_page_renders_offline_in_chromium(served_book):
    playwright = pytest.importorskip("playwright.sync_api")
    site, base = served_book
    pages = sorted(
        p.relative_to(site).parent.as_posix()
        for p in site.rglob("index.html")
        if "assets" not in p.parts
    )
    assert len(pages) >= 3
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    problems = []
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        for rel in pages:
            url = f"{base}/{'' if rel == '.' else rel + '/'}"
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            outside, errors = [], []

            def route(r, outside=outside):
                if r.request.url.startswith(base):
                    r.continue_()
                else:
                    outside.append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.on("console", lambda m, errors=errors: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
            page.goto(url, wait_until="networkidle")
            text = page.inner_text("body")  # the article, and the navigation and contents beside it
            state = page.evaluate(
                """() => ({
                  math: [...document.querySelectorAll('article math')]
                          .filter(m => m.getBoundingClientRect().width > 0).length,
                  mathTotal: document.querySelectorAll('article math').length,
                  brokenImages: [...document.querySelectorAll('article img')]
                          .filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
                  rawDiagrams: document.querySelectorAll('pre.mermaid, div.mermaid').length,
                })"""
            )
            name = "index" if rel == "." else rel.replace("/", "-")
            page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
            page.close()
            for raw in ("\\(", "\\[", "$$", "\\frac", "\\sqrt"):
                if raw in text:
                    problems.append(f"{url}: raw TeX {raw!r} left in the page")
            if state["math"] != state["mathTotal"]:
                problems.append(
                    f"{url}: {state['mathTotal'] - state['math']} formulas did not render"
                )
            if state["brokenImages"]:
                problems.append(f"{url}: figures did not load: {state['brokenImages']}")
            if state["rawDiagrams"]:
                problems.append(f"{url}: diagram source left unrendered")
            problems += [f"{url}: request left localhost: {u}" for u in outside]
            problems += [f"{url}: console error: {e}" for e in errors]
        browser.close()
    assert not problems, "\n".join(problems)


def test_committed_diagrams_are_what_the_script_draws(tmp_path):
    # A diagram edited in the script but not regenerated would silently disagree with the book.
    subprocess.run(
        [sys.executable, str(REPO / "book" / "figures.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    drawn = sorted(p.name for p in tmp_path.glob("*.svg"))
    committed = REPO / "docs" / "assets" / "diagrams"
    assert drawn == sorted(p.name for p in committed.glob("*.svg"))
    for name in drawn:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name
