"""Model libraries: WebUI folder layouts plus a SQLite index of what is installed."""

from sdkit.hub.library.identified import Identified, identify_file, settled_family
from sdkit.hub.library.index import Entry, Index, IndexDamaged
from sdkit.hub.library.layouts import LAYOUTS, Layout, detect_layout
from sdkit.hub.library.library import Library, Placement, find_library_root
from sdkit.hub.library.lookup import LookupResult, lookup_file
from sdkit.hub.library.scan import (ScanReport, VerifyReport, open_for_scan, scan_library,
                                    verify_library)

__all__ = [
    "LAYOUTS", "Entry", "Identified", "Index", "IndexDamaged", "Layout", "Library", "LookupResult", "Placement",
    "ScanReport", "VerifyReport", "detect_layout", "find_library_root", "lookup_file",
    "identify_file", "open_for_scan", "scan_library", "settled_family", "verify_library",
]
