"""Run pretrained transformers v5 MoE models with moekit: wrap their sparse blocks, sharing weights.

    import moekit, moekit.hf
    model = moekit.hf.wrap(AutoModelForCausalLM.from_pretrained(path))
    with moekit.route(model, kind="topp", p=0.5):      # re-route, weights untouched
        model.generate(ids)
    moekit.hf.unwrap(model)                            # the original modules back

See docs/hf.md for what is shared, the supported families and how blocks are detected.
"""

from moekit.hf.block import HFMoEBlock
from moekit.hf.detect import TESTED_BLOCKS, UnsupportedBlockError, read_block
from moekit.hf.load import load_pretrained
from moekit.hf.version import SUPPORTED_TRANSFORMERS, check_transformers_version
from moekit.hf.wrap import unwrap, verify, verify_block, wrap, wrapped_blocks

__all__ = [
    "SUPPORTED_TRANSFORMERS", "TESTED_BLOCKS", "HFMoEBlock", "UnsupportedBlockError", "check_transformers_version",
    "load_pretrained", "read_block", "unwrap", "verify", "verify_block", "wrap", "wrapped_blocks",
]
