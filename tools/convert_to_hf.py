"""Convert a pruned NeuroPrune DeepSpeed checkpoint to a Hugging Face model; the same as ``neuroprune convert``.

    python tools/convert_to_hf.py CKPT_DIR OUT_DIR --format dense|compact [--tag TAG] [--overwrite]
                                  [--no-verify] [--threshold [EPS]] [--dtype bf16|fp16|fp32]
                                  [--allow-incomplete]

See ``neuroprune convert --help``.
"""

import sys

from neuroprune_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
