"""mkdocs hooks: the benchmarks page's tables from benchmarks/results/*.csv (and one file's table wherever a
page says `<!-- results: NAME -->`), and the reproduction report (REPRODUCTION.md and its figures in
reproduction/, written by `make reproduce`) as a page of the site."""
import glob
import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- results-tables -->"
ONE = re.compile(r"<!-- results: ([\w-]+) -->")


def _gen_results():
    spec = importlib.util.spec_from_file_location("gen_results", os.path.join(ROOT, "docs", "gen_results.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files, config):
    from mkdocs.structure.files import File  # here, so the page hook imports without mkdocs (the test suite's venv)

    report = os.path.join(ROOT, "REPRODUCTION.md")
    if os.path.exists(report):
        with open(report) as f:
            files.append(File.generated(config, "reproduction-report.md", content=f.read()))
    for path in sorted(glob.glob(os.path.join(ROOT, "reproduction", "*.png"))):
        files.append(File.generated(config, "reproduction/" + os.path.basename(path), abs_src_path=path))
    return files


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, _gen_results().render())
    return ONE.sub(lambda m: _gen_results().render_one(m.group(1)), markdown)
