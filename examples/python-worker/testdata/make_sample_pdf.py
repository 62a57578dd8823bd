#!/usr/bin/env python3
"""Writes testdata/sample.pdf: a small, valid, 3-page PDF with known text.

The PDF is written by hand (no PDF library) so the test fixture does not
depend on the library under test. Structure:

    1 0 obj  Catalog  -> 2 0 R
    2 0 obj  Pages    -> Kids [page objects]
    3 0 obj  Font     Helvetica (one of the standard 14: nothing embedded)
    then, per page: a Page object and its content stream

followed by a cross-reference table whose entries are the exact byte offsets
of each object, and a trailer. Run it from anywhere:

    python3 testdata/make_sample_pdf.py            # writes next to itself
    python3 testdata/make_sample_pdf.py out.pdf
"""

from __future__ import annotations

import sys
from pathlib import Path

# The text of each page; test_example.py checks these come back out.
PAGES = [
    "Page one: the cerebral cortex.",
    "Page two: the hippocampus and memory.",
    "Page three: the cerebellum and motion.",
]


def _escape(text: str) -> str:
    """Escapes a string for a PDF literal string: ( ) and \\ need a backslash."""
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def build_pdf(pages: list[str]) -> bytes:
    """Returns the bytes of a PDF with one page (US Letter) per string."""
    objects: list[bytes] = []  # objects[i] is object number i + 1

    n = len(pages)
    first_page_obj = 4  # 1 catalog, 2 pages, 3 font, then page/content pairs
    page_ids = [first_page_obj + 2 * i for i in range(n)]

    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    kids = " ".join(f"{pid} 0 R" for pid in page_ids)
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode())
    objects.append(
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica"
        b" /Encoding /WinAnsiEncoding >>"
    )
    for i, text in enumerate(pages):
        content_id = page_ids[i] + 1
        objects.append(
            (
                "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792]"
                f" /Resources << /Font << /F1 3 0 R >> >> /Contents {content_id} 0 R >>"
            ).encode()
        )
        stream = f"BT /F1 12 Tf 72 720 Td ({_escape(text)}) Tj ET\n".encode("latin-1")
        objects.append(
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"endstream"
        )

    # Header; the second line's high bytes mark the file as binary.
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets: list[int] = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"

    xref_offset = len(out)
    out += b"xref\n0 %d\n" % (len(objects) + 1)
    # Each entry is exactly 20 bytes: 10-digit offset, 5-digit generation,
    # type, and a two-byte end of line ("\r\n" or " \n").
    out += b"0000000000 65535 f\r\n"
    for offset in offsets:
        out += b"%010d 00000 n\r\n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\n" % (len(objects) + 1)
    out += b"startxref\n%d\n%%%%EOF\n" % xref_offset
    return bytes(out)


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("sample.pdf")
    target.write_bytes(build_pdf(PAGES))
    print(f"wrote {target} ({len(PAGES)} pages)")


if __name__ == "__main__":
    main()
