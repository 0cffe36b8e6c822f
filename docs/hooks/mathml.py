"""Build-time math: turn the TeX that arithmatex marks up into MathML, which browsers render natively.

The book must read offline, so no math library is fetched when a page is viewed. ``pymdownx.arithmatex``
(generic mode) finds ``$...$`` and ``$$...$$`` and wraps their TeX in ``<span class="arithmatex">\\(..\\)``
or ``<div class="arithmatex">\\[..\\]``; this hook replaces each with the MathML that ``latex2mathml``
produces. A formula that cannot be converted fails the build, naming the page and the formula.
"""

import html
import re

from latex2mathml.converter import convert

_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.DOTALL)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.DOTALL)


def _to_mathml(tex: str, display: str, page) -> str:
    try:
        return convert(html.unescape(tex).strip(), display=display)
    except Exception as error:  # the converter raises several types; all mean bad TeX
        raise ValueError(f"{page.file.src_path}: cannot convert math {tex!r}: {error}") from error


def on_page_content(content: str, page, config, files) -> str:
    content = _BLOCK.sub(lambda m: _to_mathml(m.group(1), "block", page), content)
    return _INLINE.sub(lambda m: _to_mathml(m.group(1), "inline", page), content)
