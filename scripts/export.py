"""Merge LoRA adapters into their base: a plain transformers folder that from_pretrained loads without peft.

    python scripts/export.py outputs/<run>/checkpoints/step_100 /tmp/merged    # a LoRA policy checkpoint
    python scripts/export.py outputs/<sft run>/adapter /tmp/merged               # an SFT or reward stage's adapters

The base is the one the adapters were trained on (rlhf_base.json in the adapter folder); the tokenizer is the
adapter folder's. A run without model.lora already saves plain folders: nothing to export.
"""

import argparse

from rlhf.runtime.errors import exit_on_user_error


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapters", help="adapter folder, or a policy checkpoint folder step_<N> (its policy/)")
    p.add_argument("out", help="folder to write the merged model and tokenizer to (replaced if it exists)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged weights")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    from rlhf.lora import export_merged

    args = parse_args(argv)
    print(f"wrote {export_merged(args.adapters, args.out, args.dtype)}", flush=True)


if __name__ == "__main__":
    main()
