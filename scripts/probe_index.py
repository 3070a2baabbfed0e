"""Print pip's ``--index-url URL`` when the package index at URL answers within a few seconds.

``make setup`` runs it before installing torch from PyTorch's CPU wheel index. On a machine that
cannot reach that index, pip would retry for minutes and print dozens of ``Retrying ...
NameResolutionError`` lines before failing; this finds out in a few seconds (name resolution
included, which socket timeouts do not cover), says so in one line on stderr, prints nothing, and
``make setup`` falls back to the index pip is configured with.

Usage: ``python scripts/probe_index.py URL`` (standard library only: it runs before anything is
installed). ``RSPO_INDEX_PROBE_TIMEOUT`` sets the seconds to wait (default 3).
"""

from __future__ import annotations

import os
import sys
import threading
import urllib.error
import urllib.request

DEFAULT_TIMEOUT_S = 3.0


def unreachable_reason(url: str, timeout: float) -> str | None:
    """None when ``url`` answers (any HTTP status) within ``timeout`` seconds, else why not."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout):
                pass
            outcome.append(None)
        except urllib.error.HTTPError:  # the server answered: it is reachable
            outcome.append(None)
        except urllib.error.URLError as exc:
            outcome.append(str(exc.reason))
        except (OSError, ValueError) as exc:
            outcome.append(str(exc) or type(exc).__name__)

    # A daemon thread bounds the wait, DNS lookups included (urlopen's timeout does not cover them).
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"no answer within {timeout:g} s"
    return outcome[0]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/probe_index.py URL", file=sys.stderr)
        return 2
    url = argv[0]
    timeout = float(os.environ.get("RSPO_INDEX_PROBE_TIMEOUT", DEFAULT_TIMEOUT_S))
    reason = unreachable_reason(url, timeout)
    if reason is None:
        print(f"--index-url {url}")
    else:
        print(
            f"    {url} is unreachable ({reason}): installing torch from the index pip is configured with "
            "instead (on Linux that may be the 2.7 GB CUDA build; choose one with make setup TORCH_INDEX=<url>)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
