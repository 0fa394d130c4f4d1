"""Suite-wide settings: property-based tests draw the same examples on every run (fixed
seed), so CI cannot pass one day and fail the next on a newly drawn input."""

from hypothesis import settings

settings.register_profile("phenotyper", derandomize=True, print_blob=True)
settings.load_profile("phenotyper")
