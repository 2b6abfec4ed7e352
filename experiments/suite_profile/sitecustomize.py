"""Imported by every Python process whose PYTHONPATH leads here (suite_profile.py sets it):
where SUITE_PROFILE_OUT names a file, the process records what it compiled."""

import os

if os.environ.get("SUITE_PROFILE_OUT"):
  import recorder

  recorder.install()
