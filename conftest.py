"""Repository-wide pytest setup for lmaudit's own runs (audits/ and tests/).

The lmaudit plugin itself is loaded through its ``pytest11`` entry point, exactly as in a model team's repo.
Here we only make every run offline and pick the hypothesis profile.
"""

import os

# Never reach a model or dataset hub from a test or an audit run on this machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
