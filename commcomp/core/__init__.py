"""What every hook shares, written once: the options contract (:mod:`.options`), the hook-state
base (:mod:`.state`), registration on a process group of the hooks' own (:mod:`.registration`)
and the flat-buffer helpers (:mod:`.buckets`). Above ``collectives``, below every algorithm."""

from .buckets import bucket_lengths, write_flat_grads_
from .options import Configurable, Option, check_same_options
from .registration import hook_group, register, register_fsdp
from .state import HookState

__all__ = ["Configurable", "HookState", "Option", "bucket_lengths", "check_same_options", "hook_group",
           "register", "register_fsdp", "write_flat_grads_"]
