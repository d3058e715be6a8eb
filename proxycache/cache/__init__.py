"""
The disk tier: an index of saved slot caches (pure), the C{.meta} files
behind it (blocking, run in a thread), the saved caches with their budget,
and the service that saves and restores around requests.
"""

from proxycache.cache._entries import KEY_PATTERN, META_VERSION, Index, MetaEntry, bin_name
from proxycache.cache._meta_files import Loaded, load_index, remove_entry_files, write_meta
from proxycache.cache._tier import DiskTier
from proxycache.cache._tier_state import Catalog, Counters

__all__ = [
    "KEY_PATTERN", "META_VERSION", "Catalog", "Counters", "DiskTier", "Index", "Loaded", "MetaEntry", "bin_name",
    "load_index", "remove_entry_files", "write_meta",
]
