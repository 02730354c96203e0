import os

import torch
from hypothesis import HealthCheck, settings

# Sized so `make test` stays well under 10 minutes on a 2-core machine; FXREP_HYPOTHESIS_PROFILE=thorough
# runs more examples.
settings.register_profile("default", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("FXREP_HYPOTHESIS_PROFILE", "default"))
torch.set_num_threads(min(2, torch.get_num_threads()))
