"""Prints, for each Avro schema file named on the command line, one line
"<path>\t<fingerprint as 16 hex digits>\t<Parsing Canonical Form>", as computed by fastavro
(to_parsing_canonical_form, fingerprint(.., "CRC-64-AVRO")). Run with
PYTHONPATH=.cache/python (scripts/python-deps installs fastavro there).

fastavro's fingerprint() gives the hex of the 8 little-endian bytes single-object framing
writes; it is printed here as the 64-bit number, most significant digit first, like Java.
"""

import json
import sys

from fastavro.schema import fingerprint, to_parsing_canonical_form

for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        schema = json.load(f)
    canonical = to_parsing_canonical_form(schema)
    little_endian = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    value = int.from_bytes(little_endian, "little")
    print(f"{path}\t{value:016x}\t{canonical}")
