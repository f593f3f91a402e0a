"""Tests run offline: a hub load fails at once instead of retrying for ~20 s."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
