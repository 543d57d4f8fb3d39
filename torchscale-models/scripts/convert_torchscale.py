#!/usr/bin/env python3
"""Converts a PyTorch torchscale checkpoint (.pt) into a torchscale-rs checkpoint folder.

The folder holds model.safetensors (torchscale's state_dict names; metadata model_class,
learned_positions) and config.json (the torchscale config fields), which
`Encoder/Decoder/EncoderDecoder::from_pretrained` and `LanguageModel::from_pretrained` load.
The Rust function `torchscale_models::convert_pt` does the same without Python.

    python convert_torchscale.py model.pt --config config.json --class Decoder --out DIR

* The state_dict may be the whole file (torch.save(model.state_dict())) or sit under "model",
  "state_dict" or "module" (fairseq saves {"model": ..., "cfg": ...}).
* A prefix every key carries is stripped: "model.", "module.", and for a lone Decoder (Encoder)
  "decoder." ("encoder."), the attribute fairseq's language model keeps it under.
* config.json is the config's fields as JSON: json.dump(vars(config), f) in torchscale.
* Tensors keep their dtype (f32, f16, bf16) unless --dtype is given; tied weights are written
  under each of their names, as torchscale's state_dict lists them.
* fairseq checkpoints pickle their argparse/omegaconf config; torch >= 2.6 refuses such files
  unless --trust-pickle is given (it allows arbitrary code in the file to run: trusted files only).
Needs torch and safetensors.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file

NESTED = ("model", "state_dict", "module")
WRAPPERS = ("model.", "module.")
STACK = {"Encoder": "encoder.", "Decoder": "decoder.", "EncoderDecoder": None}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def state_dict_of(obj, path):
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in NESTED:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(torch.is_tensor(v) for v in inner.values()):
                return inner
    raise SystemExit(f"{path}: no state_dict at the top level nor under {list(NESTED)}")


def strip_prefix(keys, stack):
    prefix = ""
    while True:
        for p in WRAPPERS + ((stack,) if stack else ()):
            if keys and all(k.startswith(prefix + p) for k in keys):
                prefix += p
                break
        else:
            return prefix


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pt", help="the torch.save file")
    ap.add_argument("--config", required=True, help="JSON of the torchscale config's fields")
    ap.add_argument("--class", dest="cls", required=True, choices=sorted(STACK))
    ap.add_argument("--out", required=True, help="the checkpoint folder to write (replaced)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="store floating tensors in this dtype")
    ap.add_argument("--trust-pickle", action="store_true",
                    help="load with weights_only=False (fairseq checkpoints; trusted files only)")
    args = ap.parse_args(argv)

    with open(args.config) as f:
        try:
            fields = json.load(f)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{args.config}: invalid JSON: {e}")
    if not isinstance(fields, dict):
        raise SystemExit(f"{args.config}: expected a JSON object of config fields")

    obj = torch.load(args.pt, map_location="cpu", weights_only=not args.trust_pickle)
    sd = state_dict_of(obj, args.pt)
    prefix = strip_prefix(list(sd), STACK[args.cls])
    tensors = {}
    for k, v in sd.items():
        v = v.detach()
        if args.dtype and v.is_floating_point():
            v = v.to(DTYPES[args.dtype])
        # safetensors refuses tensors that share storage (tied weights): each gets its own copy.
        tensors[k[len(prefix):]] = v.contiguous().clone()
    learned = any(k.endswith("embed_positions.weight") for k in tensors)
    meta = {
        "model_class": args.cls,
        "learned_positions": "true" if learned else "false",
        "format": "torchscale-rs checkpoint 1",
        "converted_from": os.path.basename(args.pt),
    }

    out = os.path.abspath(args.out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata=meta)
        shutil.copyfile(args.config, os.path.join(tmp, "config.json"))
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{out}: {len(tensors)} tensors ({args.cls}, prefix stripped: {prefix!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
