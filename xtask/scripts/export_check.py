#!/usr/bin/env python3
"""PyTorch side of `cargo xtask export-check`.

For each WORK folder (written by the Rust side):
  WORK/ours.safetensors   inputs (`input.*`), our outputs (`ours.*`), and in its metadata
                          `checkpoint` = the checkpoint folder, which holds
  model.safetensors       torchscale state_dict names; metadata model_class, learned_positions
  config.json             the torchscale config fields
builds torchscale 0.3.0's model from config.json, loads model.safetensors with
load_state_dict(strict=True), runs the same call in eval mode, writes WORK/torchscale.safetensors
(the outputs, named like `ours.*` without the prefix) and prints one line per folder.

Exit status: 0 all within tolerance, 1 some output differs, 2 an error.
usage: python export_check.py [--atol A] [--rtol R] WORK...
"""

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from torchscale.architecture.config import (
    DecoderConfig,
    EncoderConfig,
    EncoderDecoderConfig,
)
from torchscale.architecture.decoder import Decoder
from torchscale.architecture.encoder import Encoder
from torchscale.architecture.encoder_decoder import EncoderDecoder
from torchscale.component.embedding import PositionalEmbedding, TextEmbedding

PADDING_IDX = 1
CLASSES = {
    "Decoder": DecoderConfig,
    "Encoder": EncoderConfig,
    "EncoderDecoder": EncoderDecoderConfig,
}


# --- shims torchscale's MoE needs on one CPU process (neither changes any number) -------------

_histc = torch.histc


def _histc_float(x, *args, **kwargs):
    # The gate histograms int64 expert ids for its logs; CPU histc only takes floats.
    return _histc(x if x.is_floating_point() else x.float(), *args, **kwargs)


def _single_process_group():
    # MOELayer asks torch.distributed for its expert groups and all-reduces a size.
    if dist.is_initialized():
        return
    fd, path = tempfile.mkstemp(prefix="export_check_pg_")
    os.close(fd)
    os.unlink(path)
    dist.init_process_group("gloo", init_method="file://" + path, rank=0, world_size=1)


class StoredUniforms:
    """Replaces torch.rand_like while a forward runs: the top-2 random policy draws one uniform
    per token and MoE layer, also in eval mode; the Rust side stored the draws it used."""

    def __init__(self, draws):
        self.draws = list(draws)

    def __enter__(self):
        self.saved = torch.rand_like

        def rand_like(t, *args, **kwargs):
            if not self.draws:
                raise RuntimeError("torchscale drew more uniforms than were stored")
            name, u = self.draws.pop(0)
            if u.shape != t.shape:
                raise RuntimeError(f"{name}: stored {tuple(u.shape)}, torchscale draws {tuple(t.shape)}")
            return u.to(dtype=t.dtype, device=t.device)

        torch.rand_like = rand_like
        return self

    def __exit__(self, *exc):
        torch.rand_like = self.saved
        if exc[0] is None and self.draws:
            raise RuntimeError(f"uniforms left unused: {[n for n, _ in self.draws]}")
        return False


# --- building -------------------------------------------------------------------------------


def tokens_embedding(vocab, dim):
    return TextEmbedding(vocab, dim, padding_idx=PADDING_IDX)


def positions_embedding(learned, max_positions, dim):
    # fairseq's offset: position t reads row t + 2.
    return PositionalEmbedding(max_positions + 2, dim) if learned else None


def build(ckpt_dir):
    model_path = os.path.join(ckpt_dir, "model.safetensors")
    with safe_open(model_path, framework="pt") as f:
        meta = f.metadata() or {}
    cls = meta.get("model_class")
    if cls not in CLASSES:
        raise ValueError(f"{model_path}: model_class {cls!r} is not one of {sorted(CLASSES)}")
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        fields = json.load(f)
    for ext in ("admin", "xmoe_paper_routing"):
        if fields.get(ext):
            raise ValueError(f"config.json: `{ext}` is a torchscale-rs extension torchscale lacks")
    state = load_file(model_path)
    learned = meta.get("learned_positions")
    if learned is None:
        learned = any(k.endswith("embed_positions.weight") for k in state)
    else:
        learned = learned == "true"
    cfg = CLASSES[cls](**fields)
    if cls == "Decoder":
        model = Decoder(
            cfg,
            embed_tokens=tokens_embedding(cfg.vocab_size, cfg.decoder_embed_dim),
            embed_positions=positions_embedding(learned, cfg.max_target_positions, cfg.decoder_embed_dim),
        )
    elif cls == "Encoder":
        model = Encoder(
            cfg,
            embed_tokens=tokens_embedding(cfg.vocab_size, cfg.encoder_embed_dim),
            embed_positions=positions_embedding(learned, cfg.max_source_positions, cfg.encoder_embed_dim),
        )
    else:
        enc_tokens = tokens_embedding(cfg.vocab_size, cfg.encoder_embed_dim)
        # With share_all_embeddings torchscale hands the encoder's table to the decoder itself.
        dec_tokens = None if cfg.share_all_embeddings else tokens_embedding(cfg.vocab_size, cfg.decoder_embed_dim)
        model = EncoderDecoder(
            cfg,
            encoder_embed_tokens=enc_tokens,
            encoder_embed_positions=positions_embedding(learned, cfg.max_source_positions, cfg.encoder_embed_dim),
            decoder_embed_tokens=dec_tokens,
            decoder_embed_positions=positions_embedding(learned, cfg.max_target_positions, cfg.decoder_embed_dim),
        )
    model.load_state_dict(state, strict=True)
    model.eval()
    return cls, model


# --- running --------------------------------------------------------------------------------


def uniforms(inputs, prefix=""):
    draws = []
    for k, v in inputs.items():
        head = "input.moe_uniform." + prefix + "layers."
        if k.startswith(head):
            layer = int(k[len(head):].split(".")[0])
            draws.append((layer, k, v))
    return [(k, v) for _, k, v in sorted(draws)]


def run(cls, model, inputs, wanted):
    out = {}
    with torch.no_grad():
        if cls == "Decoder":
            with StoredUniforms(uniforms(inputs)):
                out["logits"], _ = model(inputs["input.prev_output_tokens"])
        elif cls == "Encoder":
            mask = inputs["input.encoder_padding_mask"].bool()
            with StoredUniforms(uniforms(inputs)):
                out["encoder_out"] = model(
                    src_tokens=inputs["input.src_tokens"], encoder_padding_mask=mask
                )["encoder_out"]
        else:
            src, prev = inputs["input.src_tokens"], inputs["input.prev_output_tokens"]
            if "logits" in wanted:
                # torchscale's own forward: no padding mask reaches the encoder.
                out["logits"], _ = model(src, prev)
            if "logits_masked" in wanted:
                mask = inputs["input.encoder_padding_mask"].bool()
                enc = model.encoder(src, encoder_padding_mask=mask)
                out["logits_masked"], _ = model.decoder(prev, encoder_out=enc)
    missing = set(wanted) - set(out)
    if missing:
        raise ValueError(f"no torchscale call for {sorted(missing)}")
    return {k: out[k].contiguous() for k in wanted}


def compare(got, want, atol, rtol):
    """Max abs error, max rel error over entries >= 1% of want's largest magnitude, and pass."""
    if got.shape != want.shape:
        return float("inf"), float("inf"), False
    g, w = got.double(), want.double()
    d = (g - w).abs()
    wmax = w.abs().max().item() if w.numel() else 0.0
    sig = (w.abs() >= 0.01 * wmax) & (w != 0)
    max_rel = (d[sig] / w[sig].abs()).max().item() if sig.any() else 0.0
    ok = bool((d <= atol + rtol * w.abs()).all())
    return d.max().item(), max_rel, ok


def check(work, atol, rtol):
    ours_path = os.path.join(work, "ours.safetensors")
    with safe_open(ours_path, framework="pt") as f:
        ckpt_dir = (f.metadata() or {}).get("checkpoint", work)
    stored = load_file(ours_path)
    inputs = {k: v for k, v in stored.items() if k.startswith("input.")}
    ours = {k[len("ours."):]: v for k, v in stored.items() if k.startswith("ours.")}
    cls, model = build(ckpt_dir)
    theirs = run(cls, model, inputs, sorted(ours))
    save_file(theirs, os.path.join(work, "torchscale.safetensors"))
    parts, ok = [], True
    for k in sorted(ours):
        a, r, p = compare(ours[k], theirs[k], atol, rtol)
        ok &= p
        parts.append(f"{k}: max_abs={a:.3e} max_rel={r:.3e}")
    name = os.path.basename(os.path.normpath(work))
    print(f"{name} ({cls}, strict load OK) {'PASS' if ok else 'FAIL'}  " + "  ".join(parts), flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atol", type=float, default=5e-6)
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("work", nargs="+")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.histc = _histc_float
    _single_process_group()
    ok = True
    try:
        for w in args.work:
            ok &= check(w, args.atol, args.rtol)
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - report any failure as exit status 2
        import traceback

        traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
