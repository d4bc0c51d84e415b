"""Progress bars: tqdm when asked for (the CLI asks), silent otherwise."""
from __future__ import annotations


def progress(iterable=None, enabled: bool = False, **kwargs):
    """Wrap ``iterable`` in a tqdm bar when ``enabled``; otherwise return a silent stand-in."""
    from tqdm.auto import tqdm
    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, leave=False, **kwargs)
