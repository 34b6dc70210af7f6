"""`moekit export RUN --to hf DIR`: a transformers checkpoint with the identical routing rule."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    x = subparsers.add_parser("export", help="write a trained run as a transformers checkpoint (identical routing)")
    x.add_argument("run", help="a moekit run directory, or a directory `moekit compress --hf` wrote")
    x.add_argument("--to", choices=["hf"], required=True, help="target format (hf: transformers)")
    x.add_argument("dir", help="output directory (must not exist or be empty)")


def run(args) -> int:
    from moekit.compress.hf import export_hf_dir, is_compressed_hf
    from moekit.hf.export import check_export_target, export_hf
    from moekit.train import load_trained

    check_export_target(args.dir)  # before the model is loaded
    if is_compressed_hf(args.run):  # what `moekit compress --hf` wrote: refused in one line if transformers cannot hold it
        path = export_hf_dir(args.run, args.dir)
        print(f"moekit export: wrote {path}; load it with AutoModelForCausalLM.from_pretrained({str(path)!r})")
        return 0
    model, _, tokenizer = load_trained(args.run)
    path = export_hf(model, args.dir, tokenizer=tokenizer)
    print(f"moekit export: wrote {path} (config.json + safetensors); load it with "
          f"AutoModelForCausalLM.from_pretrained({str(path)!r})")
    return 0
