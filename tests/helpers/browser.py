"""The one rule for tests that need a real browser (headless Chromium).

A browser check needs a browser: on a machine without Chromium such a test is skipped with
one reason naming the package to install. `.ci/run` installs Chromium and sets
`BCDNET_REQUIRE_BROWSER=1`, which turns that skip into a failure, so CI cannot pass without
the real browser run.
"""

import os
import shutil

import pytest

REQUIRE_VAR = "BCDNET_REQUIRE_BROWSER"
INSTALL_HINT = "Debian/Ubuntu: apt-get install -y chromium"


def chromium() -> list[str]:
  """The headless Chromium command line (executable and flags) to append a URL and options
  to. Skips the calling test when no `chromium`/`chromium-browser` is on PATH, or fails it
  when the environment sets BCDNET_REQUIRE_BROWSER to anything but '' or '0'."""
  exe = shutil.which("chromium") or shutil.which("chromium-browser")
  if exe is None:
    reason = f"no headless Chromium on PATH ({INSTALL_HINT})"
    if os.environ.get(REQUIRE_VAR, "") not in ("", "0"):
      pytest.fail(f"{reason}, and {REQUIRE_VAR} is set: this run requires the browser check",
                  pytrace=False)
    pytest.skip(reason)
  return [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
