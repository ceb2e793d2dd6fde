"""megatron_outeff."""

import warnings as _warnings

# megatron-core warns on import, once per module, that the optional apex / Transformer Engine are
# absent. This package never needs them (apex is optional by design), and the warnings would put
# several lines on the stderr of every CLI that imports megatron, ahead of its one-line errors.
_warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
