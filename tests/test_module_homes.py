"""Modules live where their job is, and the old public paths still import."""

import zerojax.config.xla_flags as flags
import zerojax.xla_flags as old_flags


def test_xla_flags_moved_into_the_config_layer_and_still_imports_from_its_old_path():
    assert (old_flags.FLAG_NAMES, old_flags.merge_flags, old_flags.xla_flags) == (
        flags.FLAG_NAMES, flags.merge_flags, flags.xla_flags)
