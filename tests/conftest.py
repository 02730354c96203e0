import os

import torch
from hypothesis import HealthCheck, settings

# `make test` is sized to stay well under 10 minutes on a 2-core machine and is derandomized: the same
# examples on every run and every machine, so a clean clone passes or fails as CI did. Exploration is
# `make fuzz` (FXREP_HYPOTHESIS_PROFILE=thorough: more examples, a new random seed each run; a failure
# prints the @reproduce_failure blob to pin it).
_quiet = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("default", max_examples=50, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_quiet)
settings.register_profile("thorough", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=_quiet)
settings.load_profile(os.environ.get("FXREP_HYPOTHESIS_PROFILE", "default"))
torch.set_num_threads(min(2, torch.get_num_threads()))
